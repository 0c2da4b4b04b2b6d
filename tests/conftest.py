"""Shared test setup (pytest loads this before any test module).

* ``tests/`` is on ``sys.path`` (rootdir conftest), so test modules import the helpers of the
  ``support`` package beside them (support/__init__.py lists them: the layer cases, the per-sample
  Jacobian oracle, the optimizer's dense step oracle, rel_err, ...). No test module imports another.
  File names say what they test: test_<component>_<what>.py, component one of layer, codegen,
  triton, ir, optim, capture, cli, examples, benchmarks (and a few single-subject files).

* One torch thread for every test. The tensors here are tiny, so intra-op threads only add
  synchronisation (the layer battery ran 1.6x to 2.8x slower on 2 threads than on 1 on a 2-core machine);
  and several benchmark mains that the smoke tests call set the thread count for the whole process, so
  without this fixture the count every later test ran with depended on file order. The count is put
  back after each test. Code whose choice depends on the thread count (the per-sample conv kernel rule)
  is tested with the count monkeypatched, not with the real one.

* ``@pytest.mark.background("<job>")`` (declared in pyproject.toml): the test's work runs in other
  processes (spawned process groups, subprocesses, a compiler, the Triton interpreter battery). Those
  jobs start when collection ends and run, at a lower priority, on the machine's second core while this
  process runs the other tests; the marked tests run last and assert on their job's result
  (support/background.py).

* ``@pytest.mark.interpreter`` (declared in pyproject.toml): the test runs generated Triton kernels on
  CPU tensors through the Triton interpreter. The fixture below sets ``TRITON_INTERPRET=1`` for that
  test only (monkeypatch: gone afterwards) and skips it, with the reason, when triton cannot be
  imported. When triton reads the variable: ``@triton.jit`` reads it each time it decorates a
  function (triton.knobs.runtime.interpret, looked up in the environment at each access), and

  - tengrad's kernels are generated and imported at run time (tengrad/codegen/triton/cache.py), inside
    the test, so they are decorated while the fixture has the variable set; ``interpreting()`` is part
    of their source key (tengrad/codegen/triton/run.py; the interpreter's source has its own configs),
    so a kernel decorated under the interpreter is never reused outside it or the other way round;
  - triton's own standard library (``tl.zeros``, ``tl.sum``, ...) is decorated once, at ``import
    triton``: a kernel run by the interpreter fails calling it ("Cannot call @triton.jit'd outside of
    the scope of a kernel") unless triton was imported under the interpreter. So ``pytest_configure``
    imports triton once with the variable set and removes it again right after, before any test
    module is collected. The rest of the session runs without it: tengrad reads it at run time too
    (``backend='triton'`` refuses CPU tensors outside the interpreter), and only the marked tests see it.
    As before this change, triton in the pytest process then runs kernels through the interpreter only
    (benchmarks/gpu.py on a GPU runs in its own process).
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

TORCH_THREADS = 1


def pytest_configure(config):
    torch.set_num_threads(TORCH_THREADS)
    _import_triton_under_the_interpreter()


def _import_triton_under_the_interpreter() -> None:
    """Import triton with TRITON_INTERPRET=1 (its standard library is decorated at import; see the module
    docstring), then remove the variable again. Nothing to do when triton is missing (the marked tests skip),
    already imported, or the caller set TRITON_INTERPRET themselves."""
    if "triton" in sys.modules or "TRITON_INTERPRET" in os.environ or importlib.util.find_spec("triton") is None:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken triton: the interpreter tests skip with the import error
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """Tests marked ``background`` run after the others (stable order otherwise): their jobs then have the
    whole session to finish on the other core (support/background.py)."""
    items.sort(key=lambda item: item.get_closest_marker("background") is not None)


def pytest_collection_finish(session):
    """Start the background job of every selected test marked ``background`` (not for --collect-only)."""
    if session.config.option.collectonly:
        return
    from support import background

    jobs: dict[str, list] = {}
    for item in session.items:
        for m in item.iter_markers("background"):
            jobs.setdefault(m.args[0], []).append(item)
    for name, items in jobs.items():
        background.start(name, items)


def pytest_sessionfinish(session, exitstatus):
    from support import background

    background.stop_all()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts with TORCH_THREADS threads, whatever an earlier test (a benchmark's main) set."""
    if torch.get_num_threads() != TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)
    yield


@pytest.fixture(autouse=True)
def _triton_interpreter(request):
    """TRITON_INTERPRET=1 for the duration of each test marked ``interpreter``; nothing otherwise."""
    if request.node.get_closest_marker("interpreter") is None:
        yield
        return
    pytest.importorskip("triton", reason="triton is not installed (the interpreter tests need it)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield
