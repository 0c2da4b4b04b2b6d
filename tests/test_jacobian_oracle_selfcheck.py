"""The per-sample Jacobian oracle (support/jacobian_oracle.py) against closed forms and a naive per-sample
loop of torch.autograd.grad (float64): frozen parameters left out, Linear's J written out, an Embedding's
padding row, float32 inputs upcast exactly, and the helpers. On every layer case the oracle is checked
against the loop in test_layer_cases_vs_oracle.py (in the same pass that uses it).

Needs no tengrad: it proves the reference the layer tests rely on.
"""
import torch
from torch import nn

from support.jacobian_oracle import (
    oracle_gram,
    oracle_jvp,
    oracle_vjp,
    per_sample_jacobian,
    per_sample_jacobian_loop,
    split_rows,
)
from support.numerics import rel_err


def test_frozen_params_are_excluded():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    lin.weight.requires_grad_(False)
    x = torch.randn(4, 3, dtype=torch.float64)
    gy = torch.randn(4, 2, dtype=torch.float64)
    J = per_sample_jacobian(lin, x, gy)
    assert J.shape == (4, 2)
    assert rel_err(J, gy) <= 1e-15  # d<gy, W x + b>/db = gy


def test_linear_closed_form():
    """Linear: J_i = [vec(gy_i x_i^T), gy_i] summed over extra dims."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    gy = torch.randn(4, 5, 2, dtype=torch.float64)
    J = per_sample_jacobian(lin, x, gy)
    Jw = torch.einsum("nto,nti->noi", gy, x).reshape(4, -1)
    Jb = gy.sum(1)
    assert rel_err(J, torch.cat([Jw, Jb], 1)) <= 1e-14


def test_embedding_padding_row_is_zero():
    emb = nn.Embedding(4, 2, padding_idx=1).double()
    x = torch.tensor([[1, 1, 0], [2, 1, 3]])
    gy = torch.randn(2, 3, 2, dtype=torch.float64)
    J = per_sample_jacobian(emb, x, gy).reshape(2, 4, 2)
    assert torch.all(J[:, 1] == 0)
    assert rel_err(J[0, 0], gy[0, 2]) <= 1e-15


def test_float32_inputs_are_upcast_exactly():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    x = torch.randn(3, 2, 5, 5)
    gy = torch.randn(3, 3, 3, 3)
    J = per_sample_jacobian(conv, x, gy)
    assert J.dtype == torch.float64
    J_ref = per_sample_jacobian_loop(conv.double(), x.double(), gy.double())
    assert rel_err(J, J_ref) <= 1e-13


def test_helpers():
    torch.manual_seed(0)
    J = torch.randn(3, 7, dtype=torch.float64)
    shapes = [torch.Size([2, 3]), torch.Size([1])]
    p = [torch.randn(2, 3, dtype=torch.float64), torch.randn(1, dtype=torch.float64)]
    u = torch.randn(3, dtype=torch.float64)
    assert rel_err(oracle_gram(J), J @ J.T) == 0
    assert rel_err(oracle_jvp(J, p), J @ torch.cat([p[0].reshape(-1), p[1]])) == 0
    w, b = oracle_vjp(J, u, shapes)
    assert w.shape == (2, 3) and b.shape == (1,)
    assert rel_err(torch.cat([w.reshape(-1), b]), J.T @ u) == 0
    parts = split_rows(J, [("w", p[0]), ("b", p[1])])
    assert parts[0].shape == (3, 2, 3) and parts[1].shape == (3, 1)
    assert rel_err(torch.zeros(2), torch.zeros(2)) == 0
