"""``torch.einsum`` with a parameter operand: the spec the capture derives from the equation passes the
layer oracle (every order of gram / jvp / vjp / jacobian, float64 and float32).

The use is captured by the op-level capture alone (``OpCapture`` on a one-op model, no optimizer): its
plan (a ``SpecShell`` compiled from ``"n a0 a1, a1 a2 -> n a0 a2"``-style specs), its input and output
gradient, sample first, are checked against J from a loop of torch.autograd.grad in float64 (row i:
the gradient of <gy_i, y_i> with the sample's dimension selected in the op's own layout).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from support.jacobian_oracle import compare_plan
from tengrad.optim.capture.ops import OpCapture

M = 3
CASES = [   # equation, x shape, W shape, the sample's dim in the output
    ("btd,de->bte", (M, 4, 5), (5, 6), 0),
    ("de,btd->bte", (M, 4, 5), (5, 6), 0),
    ("tbd,de->tbe", (4, M, 5), (5, 6), 1),          # the batch dim is not first
    ("bd,ed->be", (M, 5), (6, 5), 0),
    ("bchw,c->bhw", (M, 4, 2, 5), (4,), 0),
    ("bti,oi->bo", (M, 4, 5), (6, 5), 0),           # t on the input alone: summed into U
    ("...d,de->...e", (M, 2, 5), (5, 4), 0),
    ("bij,jk->bik", (M, 4, 5), (5, 2), 0),
]


class Einsum(nn.Module):
    def __init__(self, eq, w_shape):
        super().__init__()
        self.eq = eq
        self.weight = nn.Parameter(torch.randn(w_shape, dtype=torch.float64))

    def forward(self, x):
        if self.eq.startswith("de,"):          # the parameter is the first operand
            return torch.einsum(self.eq, self.weight, x)
        return torch.einsum(self.eq, x, self.weight)


def _oracle_J(model, x, gy, dim):
    rows = []
    for i in range(M):
        g = torch.zeros_like(gy)
        g.select(dim, i).copy_(gy.select(dim, i))
        rows.append(torch.autograd.grad((model(x) * g).sum(), model.weight)[0].reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("eq,xs,ws,dim", CASES, ids=[c[0] for c in CASES])
def test_einsum_spec_passes_the_layer_oracle(eq, xs, ws, dim, dtype):
    torch.manual_seed(0)
    model = Einsum(eq, ws).train()
    x = torch.randn(xs, dtype=torch.float64)
    batch_dim = 1 if dim == 1 else 0
    cap = OpCapture(model, lambda: {id(model.weight): ("weight", model.weight)}, lambda: True,
                    lambda: "gradient", batch_dim=batch_dim)
    model.to(dtype)
    y = model(x.to(dtype))
    gy = torch.randn(y.shape, dtype=torch.float64)
    (y * gy.to(dtype)).sum().backward()
    uses = cap.take()
    cap.remove()
    assert len(uses) == 1, [u.name for u in uses]
    u = uses[0]
    model64 = Einsum(eq, ws)
    model64.weight.data.copy_(model.weight.detach().double())
    J = _oracle_J(model64, x, gy, dim)
    assert u.x.shape[0] == M and u.grad.shape[0] == M
    p = [torch.randn(ws, dtype=dtype)]
    fails = compare_plan(u.plan, u.plan.module, u.x, u.grad, J, p, torch.randn(M, dtype=dtype),
                         1e-10 if dtype == torch.float64 else 1e-4)
    assert not fails, fails
