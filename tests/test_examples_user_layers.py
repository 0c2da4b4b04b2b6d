"""The user-declared layers of examples/ pass the same oracle checks as the built-in ones."""
import importlib.util
import pathlib

import pytest
import torch

import tengrad
from support.jacobian_oracle import per_sample_jacobian
from support.numerics import rel_err

_path = pathlib.Path(__file__).parents[1] / "examples" / "user_layers.py"
_spec = importlib.util.spec_from_file_location("user_layers", _path)
user_layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(user_layers)

CASES = {
    "token_mixing": (lambda: user_layers.TokenMixing(7, 5), (4, 7, 3)),
    "locally_connected": (lambda: user_layers.LocallyConnected1d(3, 4, 11, 3, 2), (4, 3, 11)),
    "locally_connected_s1": (lambda: user_layers.LocallyConnected1d(2, 3, 6, 2, 1), (3, 2, 6)),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_user_layer_matches_oracle_in_every_order(name, dtype, tol):
    make, shape = CASES[name]
    gen = torch.Generator().manual_seed(7)
    module = make().to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    x = torch.randn(shape, generator=gen, dtype=dtype)
    gy = torch.randn(module(x).shape, generator=gen, dtype=dtype)
    J = per_sample_jacobian(module.double(), x.double(), gy.double())
    module.to(dtype)
    plan = tengrad.compile(module)
    p = [torch.randn(q.shape, generator=gen, dtype=dtype) for _, q in plan.params]
    u = torch.randn(shape[0], generator=gen, dtype=dtype)
    pf = torch.cat([t.double().reshape(-1) for t in p])
    for order in plan.orders("gram"):
        assert rel_err(plan.gram(x, gy, order=order).double(), J @ J.T) <= tol, order
    for order in plan.orders("jvp"):
        assert rel_err(plan.jvp(x, gy, p, order=order).double(), J @ pf) <= tol, order
    for order in plan.orders("vjp"):
        got = torch.cat([t.double().reshape(-1) for t in plan.vjp(x, gy, u, order=order)])
        assert rel_err(got, J.T @ u.double()) <= tol, order
    assert "factored_raw" in plan.orders("gram") or name == "token_mixing"
