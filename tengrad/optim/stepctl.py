"""The last part of a TENGraD step: one finiteness check, the step-size control and the update.

``directions`` is a list of (param, d, g, label): d the preconditioned direction and g the gradient of
one parameter (compute dtype), label "layer 'name'" or "parameter 'name'" for error messages.

Update (heavy ball, like torch.optim.SGD, with nu from the step-size control)::

    buf  = momentum * buf + nu d          (buf = nu d on the first step)
    theta <- theta - lr * buf
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tengrad.optim.errors import TENGraDError

Direction = tuple[Tensor, Tensor, Tensor, str]


def check_finite(directions: Sequence[Direction]) -> None:
    """Raise naming the first layer with a non-finite gradient, else the first non-finite direction.

    Fast path: one sum per direction and a single host sync (a non-finite g makes d non-finite, since
    d = (g - R^T u) / a). Only when a sum is not finite (a non-finite entry, or a finite overflow of the
    sum) are the tensors searched element-wise; a sum that merely overflowed raises nothing.
    """
    if not directions:
        return
    sums = torch.stack([d.sum().to(torch.float64) for _, d, _, _ in directions])
    if bool(torch.isfinite(sums).all()):
        return
    for _, _, g, label in directions:
        if not bool(torch.isfinite(g).all()):
            raise TENGraDError(f"{label}: non-finite gradient")
    for _, d, _, label in directions:
        if not bool(torch.isfinite(d).all()):
            raise TENGraDError(f"{label}: the preconditioned direction has non-finite entries")


def inner(directions: Sequence[Direction]) -> Tensor:
    """sum over parameters of <d, g> (float64 scalar tensor)."""
    return torch.stack([torch.dot(d.reshape(-1), g.reshape(-1)).to(torch.float64)
                        for _, d, g, _ in directions]).sum()


def apply(opt: torch.optim.Optimizer, directions: Sequence[Direction], lr: float, momentum: float,
          nu: float = 1.0) -> None:
    """Momentum update of every parameter with multi-tensor (foreach) ops. The directions are owned
    by the step and are scaled or kept as momentum buffers in place."""
    if not directions:
        return
    params = [p for p, _, _, _ in directions]
    ds = [d if d.dtype == p.dtype else d.to(p.dtype) for p, d, _, _ in directions]
    if nu != 1.0:
        torch._foreach_mul_(ds, nu)
    if momentum:
        bufs, fresh = [], []
        for p, d in zip(params, ds):
            state = opt.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                state["momentum_buffer"] = d          # first step: buf = nu d (d is owned by this step)
                fresh.append(d)
            else:
                bufs.append((buf, d))
        if bufs:
            old = [b for b, _ in bufs]
            torch._foreach_mul_(old, momentum)
            torch._foreach_add_(old, [d for _, d in bufs])
        ds = [opt.state[p]["momentum_buffer"] for p in params]
    torch._foreach_add_(params, ds, alpha=-lr)
