"""Theorem 1 (paper, section 4): with exact gradients (full batch) and the exact Fisher, TENGraD on an
over-parameterised two-layer ReLU network drives the squared error to zero at a linear rate.

Setting: 16 samples in R^8 with unit-norm inputs and O(1) targets, width 512, one output, mse loss,
fisher="exact", lr 0.4, damping 1e-8, momentum 0 (the theorem's update (12) has none), float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tengrad.optim import TENGraD


def test_full_batch_exact_fisher_converges_linearly():
    torch.manual_seed(0)
    n, d, width = 16, 8, 512
    x = torch.randn(n, d, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    y = torch.randn(n, 1, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, 1)).double()
    opt = TENGraD(model, lr=0.4, damping=1e-8, momentum=0.0, fisher="exact", update_freq=1, kl_clip=None, prior=None)
    losses = []
    for _ in range(12):
        out = model(x)
        opt.zero_grad()
        losses.append(float(opt.backward(out, y, loss="mse")))
        opt.step()
    with torch.no_grad():
        losses.append(float(F.mse_loss(model(x), y)))
    print("losses:", " ".join(f"{v:.3e}" for v in losses))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[0] / losses[-1] >= 1e9, losses
