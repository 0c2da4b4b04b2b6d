"""CI smoke test: ``benchmarks/gpu.py --tiny`` runs end to end under the Triton interpreter.

It checks every generated kernel against the torch backend on tiny sizes and prints the table; a
subprocess keeps its ``TRITON_INTERPRET=1`` away from this process.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.interpreter
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gpu_benchmark_tiny_runs_under_the_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", TENGRAD_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "FAIL" not in out, out
    for quantity in ("gram direct", "gram factored", "jvp forward", "vjp weight_grad"):
        assert quantity in out, out
    assert list((tmp_path / "cache").glob("tengrad_*.py")), "no generated module was written to TENGRAD_CACHE"
