"""Backend selection: 'auto' runs torch on CPU tensors, 'triton' refuses CPU tensors clearly (outside
the interpreter), and a Conv2d plan's generated source shows the spec's index maps."""
import pytest
import torch
from torch import nn

import tengrad
from tengrad.cli import main


def test_auto_runs_the_torch_backend_on_cpu():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    plan = tengrad.compile(layer, backend="auto")
    x, gy = torch.randn(4, 3), torch.randn(4, 2)
    expected = torch.einsum("no,ni->noi", gy, x).reshape(4, -1)
    expected = expected @ expected.T + gy @ gy.T  # weight and bias rows of J
    assert torch.allclose(plan.gram(x, gy), expected, rtol=1e-5, atol=1e-6)
    assert plan.backend_for(gy).name == "torch"


def test_triton_backend_refuses_cpu_tensors_by_name(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would run CPU tensors
    plan = tengrad.compile(nn.Linear(3, 2), backend="triton")
    with pytest.raises(tengrad.TengradError, match="Linear: backend='triton' runs CUDA tensors"):
        plan.gram(torch.randn(4, 3), torch.randn(4, 2))


def test_unknown_backend_is_named():
    with pytest.raises(tengrad.TengradError, match="unknown backend 'cuda'"):
        tengrad.compile(nn.Linear(3, 2), backend="cuda")


def test_explain_triton_prints_the_index_maps_in_address_arithmetic(capsys):
    pytest.importorskip("triton", reason="triton is not installed")
    assert main(["explain", "nn.Conv2d(4, 4, 3, stride=2, padding=1, dilation=2)", "--input", "2,4,9,9",
                 "--triton"]) == 0
    out = capsys.readouterr().out
    assert "i0 = 2*o0 + 2*k0 - 1" in out and "i1 = 2*o1 + 2*k1 - 1" in out
    assert "(i0 >= 0) & (i0 < 9)" in out


def test_explain_backend_triton_prints_the_kernels_of_each_step(capsys):
    """``--backend triton``: the plan is made for triton (factored_raw marked as not run, never chosen)
    and under every step of the orders it runs, the generated kernel that runs it."""
    pytest.importorskip("triton", reason="triton is not installed")
    assert main(["explain", "nn.Conv2d(16, 16, 3, padding=1, bias=False)", "--input", "8,16,3,3",
                 "--backend", "triton"]) == 0
    out = capsys.readouterr().out
    assert "backend triton" in out
    assert "x factored_raw" in out and "the triton backend has no step contract -> R, raw_cov_unfold -> C1" in out
    assert "-> jacobian_kernel: implicit-unfold GEMM per sample" in out
    assert "-> gram_factored_kernel" in out and "-> fused into gram_factored_kernel" in out
    assert "chosen factored_raw" not in out and "@triton.jit" in out
    assert main(["explain", "nn.Conv2d(16, 16, 3, padding=1, bias=False)", "--input", "8,16,3,3"]) == 0
    assert "chosen factored_raw" in capsys.readouterr().out  # the torch plan at the same sizes
