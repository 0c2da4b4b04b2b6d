"""The per-block Woodbury solve (paper, equation 4).

For one block with r Jacobian rows R [r, P] from a batch of m samples (r = m, or m*C for the exact
Fisher, see fisher.py), F = R^T R / m and, for a damping a > 0,

    d = (F + a I)^-1 g = (1/a) (g - R^T (K + m a I)^-1 R g),        K = R R^T  [r, r]

Check: (a I + R^T R / m)(1/a)(I - R^T (K + m a I)^-1 R)
     = I + R^T [ I/(m a) - (I + K/(m a)) (K + m a I)^-1 ] R = I,   as I + K/(m a) = (K + m a I)/(m a).

Two ways to hold R (``path``), chosen per layer in paths.py:

* "reuse":    keep the layer input x [m, ...] and output gradients gy [r, ...]; K = plan.gram(x, gy),
              R g = plan.jvp(x, gy, g), R^T u = plan.vjp(x, gy, u) (the paper's reuse, section 3.1).
* "jacobian": keep R itself, from plan.jacobian(x, gy) flattened to [r, P]; K = R R^T and the products
              are matrix-vector products.

The Gram matrix, the factor and both products run in float32 at least (float64 when the parameters
are float64), outside autocast. K + m a I is factored with torch.linalg.cholesky_ex; if that fails the
factorisation is retried once with 10 a, and the block then uses 10 a throughout (both the factor and
the 1/a), so d stays the exact damped inverse for the damping it reports.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor

from tengrad.codegen.torch_backend import symmetric_gram
from tengrad.optim.errors import TENGraDError


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; anything narrower (bf16, fp16, fp32) is computed in float32."""
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class BlockCurvature:
    """What one block keeps from its curvature batch (all tensors detached, in the compute dtype).

    x: layer input [r, ...] (reuse path) or None; gy: per-sample output gradients [r, ...] or None;
    jac: R [r, P] (jacobian path) or None; gram: K [r, r]; chol: L with L L^T = K + m a I;
    m: batch size; damping: the a in ``chol`` (10x ``requested`` after a retry); requested: the
    damping asked for when ``chol`` was made (a later change of the group's damping refactors K).
    pieces, scale: R held as its column blocks instead (jacobian path, ``jac`` None):
    R = scale * [pieces[0] | pieces[1] | ...], each [r, P_i] (the per-parameter Jacobians as formed,
    e.g. J / m from the backward pass: no concatenated or rescaled copy of R is made).
    """

    path: str
    x: Tensor | None
    gy: Tensor | None
    jac: Tensor | None
    gram: Tensor
    chol: Tensor
    m: int
    damping: float
    requested: float
    pieces: tuple[Tensor, ...] | None = None
    scale: float = 1.0

    def tensors(self) -> dict[str, Tensor | None]:
        """The tensors a checkpoint keeps; "jac" is R, or R / scale (the pieces side by side) when split."""
        jac = self.jac if self.pieces is None else flatten_jacobian(self.pieces)
        return {"x": self.x, "gy": self.gy, "jac": jac, "gram": self.gram, "chol": self.chol}

    def split(self) -> list[int] | None:
        """The pieces' column counts (None: R is held whole)."""
        return None if self.pieces is None else [p.shape[1] for p in self.pieces]


def factor(gram: Tensor, m: int, damping: float, layer: str) -> tuple[Tensor, float]:
    """(L, a) with L L^T = K + m a I; retries once with 10 a, else raises naming the layer."""
    if not torch.isfinite(gram).all():
        raise TENGraDError(f"layer {layer!r}: the Gram matrix J J^T has non-finite entries")
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for a in (damping, 10.0 * damping):
        chol, info = torch.linalg.cholesky_ex(gram + (m * a) * eye)
        if int(info) == 0:
            return chol, a
    raise TENGraDError(f"layer {layer!r}: Cholesky of K + m*damping*I failed even with 10x damping "
                       f"(damping={damping}, m={m}); increase the damping")


def build(plan, x: Tensor, gy: Tensor, m: int, damping: float, path: str, layer: str,
          jac: Tensor | None = None, pieces: Sequence[Tensor] | None = None, scale: float = 1.0) -> BlockCurvature:
    """The curvature of one block from x [m, ...] (already repeated to r rows) and gy [r, ...].

    ``jac``: R [r, P] when the caller already formed it; ``pieces``: R = scale * [pieces...] from
    per-parameter Jacobians [r, *p.shape] (the jacobian path; x and gy are then unused).
    K = scale^2 sum_i P_i P_i^T, a large P_i's product from its blocks on and above the diagonal
    (``_gram``: 3/4 of the flops at r = 128).
    """
    if path == "jacobian":
        if pieces is None and jac is None:
            pieces, scale = plan.jacobian(x, gy), 1.0
        if pieces is not None:
            r = pieces[0].shape[0]
            pieces = tuple(p.reshape(r, -1) for p in pieces)
            gram = _gram(pieces[0])
            for p in pieces[1:]:
                gram += _gram(p)
            if scale != 1.0:
                gram *= scale * scale
            jac = None
        else:
            gram = _gram(jac)
        x, gy = None, None
    else:
        jac, pieces = None, None
        gram = plan.gram(x, gy)
    chol, a = factor(gram, m, damping, layer)
    return BlockCurvature(path, x, gy, jac, gram, chol, m, a, damping,
                          None if pieces is None else tuple(pieces), float(scale) if pieces is not None else 1.0)


def _gram(j: Tensor) -> Tensor:
    """j j^T; from the blocks on and above the diagonal when j is large (below 2^18 elements one
    product: every extra op costs a parallel region, which waits for a descheduled thread on a
    loaded machine)."""
    return symmetric_gram(j) if j.numel() >= 2 ** 18 else j @ j.T


def flatten_jacobian(pieces: Sequence[Tensor], scale: float = 1.0) -> Tensor:
    """R [r, P] from per-parameter Jacobians [r, *p.shape] (one copy; ``scale`` applied in place)."""
    r = pieces[0].shape[0]
    if len(pieces) == 1:
        jac = pieces[0].reshape(r, -1)
        return jac * scale if scale != 1.0 else jac
    if scale == 1.0:
        return torch.cat([j.reshape(r, -1) for j in pieces], dim=1)
    # scaled while copied: one pass over J instead of a cat and an in-place multiply
    jac = pieces[0].new_empty(r, sum(j[0].numel() for j in pieces))
    start = 0
    for j in pieces:
        n = j[0].numel()
        torch.mul(j.reshape(r, n), scale, out=jac[:, start:start + n])
        start += n
    return jac


def redamp(curv: BlockCurvature, damping: float, layer: str) -> BlockCurvature:
    """The same curvature refactored for a new damping (an r x r Cholesky, no pass over the layer)."""
    chol, a = factor(curv.gram, curv.m, damping, layer)
    return replace(curv, chol=chol, damping=a, requested=damping)


def direction(curv: BlockCurvature, plan, g: Sequence[Tensor], layer: str) -> list[Tensor]:
    """d = (1/a)(g - R^T (K + m a I)^-1 R g) for g shaped like the block's params (compute dtype).

    Finiteness is not checked here: the optimizer checks every direction of a step at once.
    """
    if curv.pieces is not None:     # R = scale [P_0 | P_1 | ...]: R g = scale sum_i P_i g_i
        rg = curv.pieces[0] @ g[0].reshape(-1).to(curv.pieces[0].dtype)
        for p, t in zip(curv.pieces[1:], g[1:]):
            rg += p @ t.reshape(-1).to(p.dtype)
        if curv.scale != 1.0:
            rg *= curv.scale
    elif curv.path == "jacobian":
        if len(g) == 1:
            rg = curv.jac @ g[0].reshape(-1)
        else:
            rg = curv.jac @ torch.cat([t.reshape(-1) for t in g])    # [r]
    else:
        rg = plan.jvp(curv.x, curv.gy, list(g))                      # [r]
    u = torch.cholesky_solve(rg.reshape(-1, 1).to(curv.chol.dtype), curv.chol).reshape(-1)
    # d = g / a + R^T (-u / a): the -1/a rides on the r-vector u, so d is one pass over the parameters
    u = u * (-1.0 / curv.damping)
    if curv.pieces is not None:     # R^T u = [P_i^T (scale u)]_i
        us = u * curv.scale if curv.scale != 1.0 else u
        back = [(p.T @ us.to(p.dtype)).view(t.shape) for p, t in zip(curv.pieces, g)]
    elif curv.path == "jacobian":
        flat_back = curv.jac.T @ u.to(curv.jac.dtype)
        back, start = [], 0
        for t in g:
            back.append(flat_back[start:start + t.numel()].view(t.shape))
            start += t.numel()
    else:
        back = plan.vjp(curv.x, curv.gy, u)
    inv_a = 1.0 / curv.damping
    return [bi.to(gi.dtype).add_(gi, alpha=inv_a) for gi, bi in zip(g, back)]   # in place on b: no allocation
