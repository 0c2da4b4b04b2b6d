"""Work that some tests hand to other processes, started when collection ends so that it runs on the
machine's other core while this process runs the rest of the suite.

The suite's own process runs one test at a time on one torch thread (conftest.py), so on a 2-core machine
one core sits idle while it runs. A test whose work runs in other processes - the spawned gloo process
groups of test_optim_distributed.py, the C++ extension build of the capture-floor smoke test, the
``benchmarks/gpu.py --tiny`` subprocess, and the Triton interpreter battery of
test_triton_kernels_vs_torch_backend.py (pure-Python, single-threaded work that needs TRITON_INTERPRET=1
in its process anyway) - is marked ``@pytest.mark.background("<job>")``. conftest starts
the jobs of the selected tests (``start``), runs the marked tests after the others, and a test waits for
its job with ``get("<job>").result(...)`` (``get`` starts the job first if nothing did, e.g. when a single
test is run by node id). What a job checks is unchanged: the test asserts on its result exactly as
it asserted on the blocking call before. Background processes run at a lower priority (``NICENESS``) so
that they take the second core rather than the suite's. ``stop_all`` ends whatever still runs at the
end of the session (only processes started here).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["JOBS", "start", "get", "stop_all", "Subprocess"]


NICENESS = 10


def lower_priority(pid: int = 0) -> None:
    """Run process ``pid`` (0: this one) and what it starts later at a lower priority, so that the suite's
    own process keeps a core while background work fills the other (the work is the same, only when it
    gets the CPU changes)."""
    if hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, pid) + NICENESS))
        except OSError:
            pass


class Subprocess:
    """A command started now; ``result()`` waits (at most ``timeout`` seconds from the start, then kills
    it) and returns SimpleNamespace(returncode, out, ...) with stdout and stderr together in ``out``."""

    def __init__(self, cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = ROOT,
                 tmp: str | None = None, after: Callable[[], dict] | None = None):
        self.timeout, self.tmp, self.after = timeout, tmp, after
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        lower_priority(self._proc.pid)
        self._start = time.monotonic()
        self._result = None

    def result(self) -> SimpleNamespace:
        if self._result is None:
            try:
                code = self._proc.wait(timeout=max(0.0, self.timeout - (time.monotonic() - self._start)))
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
                code = None
            self._log.seek(0)
            out = self._log.read().decode(errors="replace")
            extra = self.after() if self.after is not None else {}
            self._result = SimpleNamespace(returncode=code, out=out, **extra)
        return self._result

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _distributed():
    """test_optim_distributed.py: every process-group check (support/distributed_workers.phases())."""
    from . import dist_harness, distributed_workers
    return dist_harness.start(distributed_workers.phases(), niceness=NICENESS)


def _cpp_floor_tap():
    """test_benchmarks_capture_overhead_smoke.py: build (or find built) the C++ gradient tap of
    benchmarks/capture_floor.py (torch.utils.cpp_extension.load_inline, about 40 s the first time). The
    test waits for this process before it loads the extension itself, so the two never build at once."""
    code = "from benchmarks.capture_floor import cpp_tap; cpp_tap()"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return Subprocess([sys.executable, "-c", code], timeout=600.0, env=env)


def _gpu_tiny():
    """test_benchmarks_gpu_tiny_smoke.py: ``benchmarks/gpu.py --tiny`` under TRITON_INTERPRET=1, in its
    own process and with its own kernel cache directory (TENGRAD_CACHE); the result lists the generated
    modules that were written there."""
    if importlib.util.find_spec("triton") is None:
        return None          # the test skips: triton is not installed
    tmp = tempfile.mkdtemp(prefix="tengrad-gpu-tiny-")
    cache = Path(tmp) / "cache"
    env = dict(os.environ, TRITON_INTERPRET="1", TENGRAD_CACHE=str(cache),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return Subprocess([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny"], timeout=300.0, env=env,
                      tmp=tmp, after=lambda: {"generated": sorted(p.name for p in cache.glob("tengrad_*.py"))})


def _triton_battery(items=None):
    """test_triton_kernels_vs_torch_backend.py: the interpreter battery (support/triton_cases.py) in its own
    process with TRITON_INTERPRET=1, for the cases of the selected tests (all without ``items``); the
    result has {case id: failure strings} as ``failures``."""
    if importlib.util.find_spec("triton") is None:
        return None          # the test module skips: triton is not installed
    tmp = tempfile.mkdtemp(prefix="tengrad-triton-battery-")
    out = Path(tmp) / "failures.json"
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))

    def failures():
        return {"failures": json.loads(out.read_text()) if out.exists() else None}

    cases = [] if items is None else [i.callspec.params["case_id"] for i in items if hasattr(i, "callspec")]
    return Subprocess([sys.executable, "-m", "support.triton_cases", "--out", str(out), *cases], timeout=600.0,
                      env=env, tmp=tmp, after=failures)


JOBS: dict[str, Callable] = {"distributed": _distributed, "cpp_floor_tap": _cpp_floor_tap, "gpu_tiny": _gpu_tiny,
                             "triton_battery": _triton_battery}
_started: dict[str, object] = {}


def start(name: str, items=None) -> None:
    """Start job ``name`` unless it has been started; ``items``: the selected tests that use it (the triton
    battery runs their cases only)."""
    if name not in _started:
        starter = JOBS[name]
        _started[name] = starter(items) if name == "triton_battery" else starter()


def get(name: str):
    """Job ``name``'s handle (started now if nothing started it); ``.result(...)`` waits for it."""
    start(name)
    return _started[name]


def stop_all() -> None:
    for job in _started.values():
        if job is not None:
            job.stop()
    _started.clear()
