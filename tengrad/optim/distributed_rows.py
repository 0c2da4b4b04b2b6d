"""One rank's Jacobian rows of one block, and the two products the distributed step needs from them.

Rank r holds x_r [m_r, ...] (its layer input, never repeated) and gy_r [reps*m_r, ...] (per-sample
output gradients; row c*m_r + i belongs to sample i, as in fisher.py), so its rows are
J_r = rows of (x_r repeated reps times, gy_r). With the block's global gradient g and a slice u_r of
u = (K + M a I)^-1 J g:

    (J_r g)[j]   = <J_r[j], g>                 plan.jvp, or J_r @ g when J_r is formed   [r_r]
    J_r^T u_r    = sum_j u_r[j] J_r[j]          plan.vjp, or J_r^T u_r                     params' shapes

The layer's per-sample output gradient is m_r * (captured grad): the loss on rank r is the mean over its
own m_r samples (DESIGN.md), whatever the other ranks hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from tengrad.optim import woodbury
from tengrad.optim.fisher import output_rows


@dataclass(eq=False)
class Rows:
    x: Tensor            # [m_r, ...] in the compute dtype (integer ids stay integer)
    gy: Tensor           # [reps * m_r, ...]
    m: int
    reps: int
    jac: Tensor | None = None   # [reps * m_r, P] once formed
    _x_rep: Tensor | None = None

    @property
    def n_rows(self) -> int:
        return self.gy.shape[0]

    def x_rep(self) -> Tensor:
        """x repeated to one row per gy row (row c*m + i is sample i)."""
        if self._x_rep is None:
            x = self.x
            self._x_rep = x if self.reps == 1 else \
                x.unsqueeze(0).expand(self.reps, *x.shape).reshape(self.reps * self.m, *x.shape[1:])
        return self._x_rep

    def form_jacobian(self, plan) -> Tensor:
        if self.jac is None:
            self.jac = torch.cat([j.reshape(j.shape[0], -1) for j in plan.jacobian(self.x_rep(), self.gy)],
                                 dim=1)
        return self.jac

    def jg(self, plan, g: Sequence[Tensor]) -> Tensor:
        if self.jac is not None:
            return self.jac @ torch.cat([t.reshape(-1) for t in g]).to(self.jac.dtype)
        return plan.jvp(self.x_rep(), self.gy, list(g)).reshape(-1)

    def jtu(self, plan, u: Tensor, like: Sequence[Tensor]) -> Tensor:
        """J_r^T u_r flattened in the block's parameter order (compute dtype)."""
        if self.jac is not None:
            return self.jac.T @ u.to(self.jac.dtype)
        back = plan.vjp(self.x_rep(), self.gy, u)
        return torch.cat([b.reshape(-1).to(t.dtype) for b, t in zip(back, like)])


def rows_from(opt, b, rec) -> Rows:
    """This rank's rows of block ``b`` from its capture record (the same rules as TENGraD._curvature)."""
    if rec is None or (rec.grad is None and not rec.rows):
        raise opt._consistency.missing_capture(b)
    dtype = woodbury.compute_dtype(b.params[0].dtype)
    x = rec.x.to(dtype) if rec.x.is_floating_point() else rec.x
    m = x.shape[0]
    opt._consistency.verify(b, x, rec.grad)     # with several ranks: the batch-dimension check only
    gy = output_rows(f"layer {b.name!r}", opt.fisher, rec.grad, rec.rows, m, dtype)
    reps = gy.shape[0] // m
    if x is rec.x:
        x = x.clone()   # kept for update_freq steps: must not alias a batch buffer the caller refills
    return Rows(x, gy, m, reps)
