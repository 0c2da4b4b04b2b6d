"""benchmarks/capture_overhead.py runs its arms (SGD, armed, reuse, staggered, floor) on tiny sizes and prints a
row per model and size; the floor arm (benchmarks/capture_floor.py) keeps, per parameter use, the op
input and the output gradient autograd computed (oracle: torch.autograd.grad of the loss with respect
to each layer output, float64). The timings themselves are benchmarks, not asserted here."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.capture_floor import FloorCapture  # noqa: E402
from support import background  # noqa: E402


@pytest.mark.parametrize("tap", ["python", pytest.param("cpp", marks=pytest.mark.background("cpp_floor_tap"))])
def test_floor_capture_keeps_inputs_and_output_gradients(tap):
    if tap == "cpp":     # the extension was being built in the background (support/background.py): wait for it
        background.get("cpp_floor_tap").result()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    try:
        floor = FloorCapture(model, tap=tap)
    except Exception as exc:     # noqa: BLE001 - the C++ tap needs a compiler and ninja
        pytest.skip(f"the C++ floor tap could not be built here ({type(exc).__name__}: {str(exc)[:200]})")
    floor.install()
    try:
        F.cross_entropy(floor.forward(x), y).backward()
        model(x)                              # inactive: passes through, records nothing
    finally:
        floor.uninstall()
    assert F.linear is floor._orig["linear"], "the functional ops were not restored"
    assert len(floor.uses) == 3
    h1 = model[0](x)
    h2 = model[1](h1)
    out = model[3](model[2](h2))
    oracle = torch.autograd.grad(F.cross_entropy(out, y), (h1, h2, out))
    inputs = (x, h1, model[2](h2))
    for (xi, _), gy, want_x, want_gy in zip(floor.uses, floor.grads(), inputs, oracle):
        torch.testing.assert_close(xi, want_x, rtol=0, atol=1e-14)
        torch.testing.assert_close(gy, want_gy, rtol=1e-12, atol=1e-14)


def test_capture_overhead_prints_a_row_per_model_and_size(capsys):
    from benchmarks import capture_overhead

    capture_overhead.main(["--repeats", "2", "--batch", "4", "--width", "2", "--d-model", "8", "16"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 3C1F") or line.startswith("| Transformer")]
    assert len(rows) == 3, out
    assert all(line.count("|") == 11 and line.rstrip().endswith(") | - |") for line in rows), rows


def test_stagger_benchmark_prints_a_row_per_model():
    """benchmarks/stagger.py: whole steps of TENGraD with and without stagger beside SGD; the row gives
    the mean and costliest step of the cycle and all ten steps of the cycle for both (timings not
    asserted)."""
    from benchmarks import stagger

    import io
    import contextlib
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        stagger.main(["--cycles", "1", "--models", "transformer"])
    rows = [line for line in buf.getvalue().splitlines() if line.startswith("| Transformer")]
    assert len(rows) == 1, buf.getvalue()
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert len(cells) == 6 and all(len(c.split()) == 10 for c in cells[4:]), cells


def test_a_killed_builds_lock_is_waited_out_then_removed(tmp_path, monkeypatch):
    """torch's build lock has no timeout: a lock left by a killed build made every later suite hang. A
    young lock is waited for until it goes stale (STALE_LOCK_S), then removed and the build proceeds."""
    import tempfile
    import time

    import torch.utils.cpp_extension as cpp_extension

    from benchmarks import capture_floor

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(capture_floor, "STALE_LOCK_S", 0.5)
    built = []
    monkeypatch.setattr(cpp_extension, "load_inline", lambda *a, **k: built.append(k["build_directory"]) or "module")
    build = tmp_path / f"tengrad_floor_tap-torch{torch.__version__.replace('+', '-')}"
    build.mkdir()
    (build / "lock").touch()
    start = time.monotonic()
    assert capture_floor.cpp_tap() == "module"
    assert time.monotonic() - start >= 0.4 and not (build / "lock").exists() and built == [str(build)]
