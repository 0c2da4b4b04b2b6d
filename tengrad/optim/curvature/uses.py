"""Blocks made of several uses: J = sum_u J_u, formed explicitly.

A block's parameters may be read by several calls in one forward: a module captured at module level
called twice, ops outside the module's forward (``F.linear(h, emb.weight)``, MultiheadAttention's
``out_proj``), slices of a parameter (q/k/v rows of ``in_proj_weight``). Use u has the plan of its op
(or module), its input x_u and output gradients gy_u (sample first, see ``sample_first``) and, per plan
parameter, where it sits in the block: ``(param, first row)`` (None: the whole parameter). The block's
per-sample Jacobian is

    J[r, :] = sum_u  scatter_u( plan_u.jacobian(x_u, gy_u)[r] )          [r, P]

(scatter_u places each of the use's parameter Jacobians at its parameter's columns, a slice at its rows'
columns, any other view - ``w.expand(..)``, ``pos[:, :T]`` - at the flat positions of its elements, summed
where a position repeats: capture/linear_uses.py), so K = J J^T = sum_{u,v} J_u J_v^T, J p = sum_u J_u p_u and J^T w = sum_u J_u^T w exactly.
The cross terms are formed through the explicit J (the "jacobian" path of woodbury.py); their
factored forms are not derived here. Memory: r x P per block.

The sample dimension of each use (``sample_first``): the step's batch m is dimension ``batch_dim`` of
the model's input. Among the leading dimensions an op may batch over (all but the feature dims for
linear/layer_norm/rms_norm/embedding; dim 0 only for convolutions and the batch/group/instance norms)
the one of size m is the sample; a declared dimension (``TENGraD(..., batch_dim={layer: dim})``) wins.
Inside MultiheadAttention uses are sequence first: [T, N, E] (dim 1) and the out projection's [T*N, E]
rows (t-major, reshaped to [T, N, E]). Several dimensions of size m (T == N) or none raise
BatchDimensionError naming the use.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tengrad.optim.capture.record import Use
from tengrad.optim.curvature.consistency import (LOW_PRECISION_TOL, TOL, BatchDimensionError, SpecMismatchError,
                                                 mismatch)
from tengrad.optim.curvature.fisher import output_rows
from tengrad.optim.errors import TENGraDError


def sample_first(name: str, x: Tensor, ts: Sequence[Tensor], m: int | None, lead: int,
                 seq_first: bool = False, declared: int | None = None,
                 key: str | None = None) -> tuple[Tensor, list[Tensor]]:
    """(x, ts) with the sample moved to dimension 0 (see module docstring). ``key``: the block's name,
    the key of ``batch_dim`` that declares its dimension (named in errors)."""
    ts = list(ts)
    if m is None:
        return x, ts
    key = key if key is not None else name.split("(")[-1].split(")")[0].rsplit(".", 1)[0]
    if declared is not None:
        if declared >= x.dim() or x.shape[declared] != m:
            cands = [d for d in range(x.dim()) if x.shape[d] == m]
            fix = (f"; its dim {cands[0]} has that size: batch_dim={{..., {key!r}: {cands[0]}}}"
                   if len(cands) == 1 else "")
            raise BatchDimensionError(
                f"layer {name!r}: batch_dim declares dim {declared} for {key!r}, but its input has shape "
                f"{tuple(x.shape)}, whose dim {declared} is not the batch m = {m} of the model's input{fix}")
        d = declared
    elif seq_first and lead >= 2:
        d = 1
    elif seq_first and lead == 1 and x.shape[0] % m == 0:
        t = x.shape[0] // m                     # rows t*N + n of MultiheadAttention's out projection
        x = x.reshape(t, m, *x.shape[1:])
        ts = [g.reshape(t, m, *g.shape[1:]) for g in ts]
        d = 1
    else:
        cands = [d for d in range(max(lead, 1)) if x.shape[d] == m]
        if len(cands) != 1:
            what = ("no leading dimension" if not cands else f"dimensions {cands} all")
            raise BatchDimensionError(
                f"layer {name!r}: its input has shape {tuple(x.shape)} and {what} of size m = {m} (the "
                f"batch of the model's input); TENGraD does not guess which dimension holds the samples. "
                "Declare it: TENGraD(model, ..., batch_dim={'': <dim of the model input>, "
                f"{key!r}: <dim of this layer's input>}})")
        d = cands[0]
    if d:
        x = x.movedim(d, 0)
        ts = [g.movedim(d, 0) for g in ts]
    return x, ts


def _offsets(params: Sequence[Tensor]) -> dict[int, int]:
    out, off = {}, 0
    for p in params:
        out[id(p)] = off
        off += p.numel()
    return out


def jacobian(params: Sequence[Tensor], calls: Sequence[Use], m: int, dtype, empirical: bool) -> Tensor:
    """J [r, P] over the block's params: sum over calls of their scattered per-sample Jacobians.
    ``empirical``: rows from m * grad; else from the curvature rows (r = C m, row c m + i)."""
    offsets = _offsets(params)
    total = sum(p.numel() for p in params)
    J = None
    for c in calls:
        x = c.x.to(dtype) if c.x.is_floating_point() else c.x
        gy = output_rows(f"use {c.name!r}", "empirical" if empirical else "mc/exact", c.grad,
                         c.rows, m, dtype)
        reps = gy.shape[0] // m
        if reps > 1:
            x = x.unsqueeze(0).expand(reps, *x.shape).reshape(reps * m, *x.shape[1:])
        r = gy.shape[0]
        if J is None:
            J = torch.zeros(r, total, dtype=dtype, device=gy.device)
        elif J.shape[0] != r:
            raise TENGraDError(f"use {c.name!r}: {r} curvature rows, other uses of its block have {J.shape[0]}")
        for part, jac in zip(c.parts, c.plan.jacobian(x, gy)):
            if part is None or id(part[0]) not in offsets:   # a frozen parameter the call also reads
                continue
            p, row0 = part
            j = jac.reshape(r, -1).to(dtype)
            if isinstance(row0, Tensor):    # a view of p: the flat positions of its elements in p
                J.index_add_(1, offsets[id(p)] + row0.reshape(-1).to(J.device), j)
                continue
            off = offsets[id(p)] + (0 if row0 is None else row0 * (p[0].numel() if p.dim() else 1))
            J[:, off:off + j.shape[1]] += j
    return J


def check(name: str, params: Sequence[Tensor], J: Tensor, m: int, grad_dtype) -> None:
    """J^T 1 / m == param.grad over the block (consistency.py's tolerance); raises naming the block."""
    grads = [p.grad for p in params]
    if all(g is None for g in grads):
        return
    a = (J[:m].sum(0) / m).to(torch.float64)
    w = torch.cat([(g.to_dense() if g.is_sparse else g).reshape(-1).to(torch.float64) if g is not None
                   else torch.zeros(p.numel(), dtype=torch.float64, device=J.device)
                   for p, g in zip(params, grads)])
    if not (torch.isfinite(a).all() and torch.isfinite(w).all()):
        return
    err, scale = mismatch(a, w)
    tol = max(TOL.get(params[0].dtype, LOW_PRECISION_TOL), TOL.get(grad_dtype, LOW_PRECISION_TOL))
    if not (err <= tol and scale > 0):
        raise SpecMismatchError(
            f"layer {name!r}: J^T 1 / m summed over its uses does not match param.grad (relative error "
            f"{err:.3g} after the best factor {scale:.3g}; tolerance {tol:g}): a parameter of this block is "
            "also read by an op without a spec, or a registered spec contradicts its op")
