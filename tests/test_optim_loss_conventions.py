"""README "Losses and conventions": mse is torch's mean, l_i = (1/C)||out_i - y_i||^2, so

* empirical Fisher: mse with (damping a, lr eta) == the sum convention with (C^2 a, C eta);
* exact Fisher: mse with damping a == -eta (F_sum + C a I)^-1 g_sum with the sum-convention
  Gauss-Newton F_sum = (1/m) sum_i J_i^T (2 I) J_i and g_sum the gradient of the sum-convention loss
  (built here from per-sample output Jacobians, torch.func, float64).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from support.numerics import rel_err
from support.step_oracle import dense_directions
from tengrad.optim import TENGraD

C = 4


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, C)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(6, C, generator=gen, dtype=torch.float64)
    return model, x, y


def sum_loss(out, y):
    return ((out - y) ** 2).flatten(1).sum(1).mean()


def test_empirical_mse_equals_the_sum_convention_with_rescaled_damping_and_lr():
    model, x, y = setup()
    a, lr = 0.05, 0.1
    runs = []
    for loss, damping, step in ((F.mse_loss, a, lr), (sum_loss, C * C * a, C * lr)):
        m = copy.deepcopy(model)
        opt = TENGraD(m, step, damping, momentum=0.0, update_freq=1, kl_clip=None)
        opt.zero_grad()
        loss(m(x), y).backward()
        opt.step()
        runs.append(torch.cat([p.detach().reshape(-1) for p in m.parameters()]))
    assert rel_err(runs[0], runs[1]) < 1e-12


def test_exact_mse_is_the_sum_convention_gauss_newton_with_c_times_damping():
    model, x, y = setup()
    a, lr = 0.05, 0.1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = list(before)
    m = x.shape[0]

    def out_i(pd, xi):
        return functional_call(model, pd, (xi.unsqueeze(0),))[0]

    jac = [jacrev(out_i)(before, x[i]) for i in range(m)]
    out = model(x).detach()
    g_sum = {n: sum(2 * jac[i][n].reshape(C, -1).T @ (out[i] - y[i]) for i in range(m)).reshape(before[n].shape) / m
             for n in names}
    opt = TENGraD(model, lr, a, momentum=0.0, fisher="exact", update_freq=1, kl_clip=None)
    o = model(x)
    opt.zero_grad()
    opt.backward(o, y, loss="mse")
    opt.step()
    J = torch.stack([torch.cat([jac[i][n].reshape(C, -1) for n in names], 1) for i in range(m)])     # [m, C, P]
    F_sum = torch.einsum("icp,icq->pq", J, J) * 2 / m
    d = dense_directions(F_sum, names, {n: t.shape for n, t in before.items()}, g_sum,
                         [b.param_names for b in opt.blocks], C * a)
    for b in opt.blocks:
        got = torch.cat([(dict(model.named_parameters())[n].detach() - before[n]).reshape(-1) for n in b.param_names])
        want = torch.cat([-lr * d[n].reshape(-1) for n in b.param_names])
        assert rel_err(got, want) < 1e-9, b.name
