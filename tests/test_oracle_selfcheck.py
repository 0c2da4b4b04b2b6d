"""The oracle checked against a naive per-sample loop of torch.autograd.grad (float64).

Needs no tengrad: it proves the reference the layer tests rely on.
"""
import pytest
import torch
from torch import nn

from support.layer_cases import CASES, make_setup_input
from support.numerics import rel_err
from support.jacobian_oracle import (
    oracle_gram,
    oracle_jvp,
    oracle_vjp,
    per_sample_jacobian,
    per_sample_jacobian_loop,
    split_rows,
    trainable_params,
)

BY_ID = {c.id: c for c in CASES}


def _setup(case, seed=0):
    torch.manual_seed(seed)
    module = case.make_module().double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = make_setup_input(case, gen, torch.float64)
    with torch.no_grad():
        y = module(x)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    if case.oracle_view is not None:   # coupled samples: the oracle's module is the affine, x_hat fixed
        module, x = case.oracle_view(module, x)
    return module, x, gy


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_vmap_oracle_matches_loop(case_id):
    module, x, gy = _setup(BY_ID[case_id])
    J = per_sample_jacobian(module, x, gy)
    J_loop = per_sample_jacobian_loop(module, x, gy)
    n_params = sum(p.numel() for _, p in trainable_params(module))
    assert J.shape == (x.shape[0], n_params)
    assert J.dtype == torch.float64
    assert J_loop.shape == J.shape
    if n_params == 0:  # e.g. LayerNorm without affine: nothing to differentiate
        return
    assert J.abs().sum() > 0
    assert rel_err(J, J_loop) <= 1e-13


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
