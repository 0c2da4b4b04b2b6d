"""Rows per token: the Fisher of a layer applied at every position of a sequence, from sampled positions.

A layer whose input carries token dimensions besides the sample (a Linear, LayerNorm or Embedding on
x [m, T, ...]: its leading dimensions, uses.py ``sample_first``) has per-sample rows

    j_i = sum_t j_it,        j_it = d/dtheta < gy_it, y_it(theta) >          (gy = m dL/dy)

(for a Linear j_it = gy_it x_it^T) and the per-sample Fisher F = (1/m) sum_i j_i j_i^T has rank m.
``TENGraD(token_rows=c)`` uses the Fisher of the positions instead, dropping the cross-position terms
(K-FAC's "expand" setting, Eschenhagen et al. 2023):

    F_tok = (1/m) sum_{i, t} j_it j_it^T

the same size as F when the positions' contributions are uncorrelated (E[j_i j_i^T] = sum_t E[j_it j_it^T]),
of rank up to m T. It is estimated from c positions s = (i, t) drawn uniformly without replacement from
the m T of the batch, the same positions for every block of that layout (m, T):

    F_hat = (1/m) (m T / c) sum_s j_s j_s^T = R^T R / c,       R_s = sqrt(T) j_s      [c, P]

so the block's rows are R with c "samples" (the Woodbury solve's m is c: K + c a I). A row is the
layer's own rows at one position: x_s and gy_s (the position's input and output gradient, with the
token dimensions kept as size 1 so the block's plan applies unchanged) with gy scaled by sqrt(T), or,
for a block summed over several uses (a tied embedding and its head, MultiheadAttention's projections:
uses.py), every use's x and gy at that same position. c >= m T takes every position, unsampled
(c = m T rows, still scaled by sqrt(T)), which is exactly F_tok.

Positions are drawn per step (``draw``), sorted, from the optimizer's ``generator`` (or torch's).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tengrad.optim.capture.record import Use


def layout(x: Tensor, ts: list[Tensor], lead: int) -> int | None:
    """T, the number of positions per sample of an input ``x`` [m, t_1, .., t_k, features] with the sample
    first and ``lead`` = 1 + k leading dims, when every output gradient in ``ts`` shares those leading
    dims and T > 1; else None (the block keeps sample rows)."""
    if lead < 2 or x.dim() < lead or any(t.dim() < lead or t.shape[:lead] != x.shape[:lead] for t in ts):
        return None
    t = math.prod(x.shape[1:lead])
    return t if t > 1 else None


def use_layout(u: Use) -> int | None:
    """``layout`` of a use with its sample first and ``u.lead`` set: its input against its output
    gradient, or its curvature rows when the ordinary backward gave it none."""
    return layout(u.x, [u.grad] if u.grad is not None else u.rows, u.lead)


def select(t: Tensor, lead: int, idx: Tensor | None, scale: float = 1.0) -> Tensor:
    """``t`` [m, t_1.., t_k, f..] (``lead`` = 1 + k) at the flat positions ``idx`` [c] (None: all, m T):
    [c, 1, .., 1, f..], times ``scale`` (a copy)."""
    feat = t.shape[lead:]
    flat = t.reshape(-1, *feat)
    rows = flat[idx] if idx is not None else flat.clone()
    if scale != 1.0:
        rows.mul_(scale)
    return rows.reshape(rows.shape[0], *[1] * (lead - 1), *feat)


def positions(m: int, t: int, c: int, generator: torch.Generator | None, device) -> Tensor | None:
    """c of the m T flat positions (sample i, position t at i T + t), sorted; None when c >= m T (all)."""
    if c >= m * t:
        return None
    perm = torch.randperm(m * t, generator=generator)
    return perm[:c].sort().values.to(device)


class Draw:
    """The positions of one curvature step: one draw per layout (m, T), the same for every block."""

    def __init__(self, c: int, generator: torch.Generator | None) -> None:
        self.c, self.generator = int(c), generator
        self.drawn: dict[tuple[int, int], Tensor | None] = {}

    def __call__(self, m: int, t: int, device) -> Tensor | None:
        if (m, t) not in self.drawn:
            self.drawn[(m, t)] = positions(m, t, self.c, self.generator, device)
        idx = self.drawn[(m, t)]
        return idx.to(device) if idx is not None else None

    def rows(self, m: int, t: int) -> int:
        """The rows a block of layout (m, T) gets: min(c, m T)."""
        return min(self.c, m * t)


def use_at(u: Use, lead: int, idx: Tensor | None, t: int, m: int) -> Use:
    """Use ``u`` (sample first) at the positions ``idx``: x and its empirical gradient or curvature rows
    selected; the gradient (dL/dy, which the Jacobian scales by the batch, fisher.output_rows) becomes
    (m sqrt(T) / c) dL/dy_s so that, scaled by the c rows it now has, it is sqrt(T) m dL/dy_s; curvature
    rows (already per-sample output gradients) are scaled by sqrt(T)."""
    c = int(idx.numel()) if idx is not None else m * t
    grad = select(u.grad, lead, idx, m * math.sqrt(t) / c) if u.grad is not None else None
    rows = [select(r, lead, idx, math.sqrt(t)) for r in u.rows]
    x = select(u.x, lead, idx)
    out = u.moved(x, grad, rows)
    out.m = c
    return out
