"""CI smoke test: ``benchmarks/gpu.py --tiny`` runs end to end under the Triton interpreter.

It checks every generated kernel against the torch backend on tiny sizes and prints the table; a
subprocess keeps its ``TRITON_INTERPRET=1`` away from this process. The subprocess starts when collection
ends and runs beside the rest of the suite (support/background.py, job "gpu_tiny", with its own
TENGRAD_CACHE directory); the test asserts on its exit code, output and generated kernel modules.
"""
from __future__ import annotations

import importlib.util

import pytest

from support import background

pytestmark = [pytest.mark.interpreter, pytest.mark.background("gpu_tiny")]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gpu_benchmark_tiny_runs_under_the_interpreter():
    proc = background.get("gpu_tiny").result()      # started when collection ended (support/background.py)
    out = proc.out
    assert proc.returncode == 0, out
    assert "FAIL" not in out, out
    for quantity in ("gram direct", "gram factored", "jvp forward", "vjp weight_grad"):
        assert quantity in out, out
    assert proc.generated, "no generated module was written to TENGRAD_CACHE"
