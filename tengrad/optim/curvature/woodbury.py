"""The per-block Woodbury solve (paper, equation 4).

For one block with r Jacobian rows R [r, P] from a batch of m samples (r = m, or m*C for the exact
Fisher, see fisher.py), F = R^T R / m and, for a damping a > 0,

    d = (F + a I)^-1 g = (1/a) (g - R^T (K + m a I)^-1 R g),        K = R R^T  [r, r]

Check: (a I + R^T R / m)(1/a)(I - R^T (K + m a I)^-1 R)
     = I + R^T [ I/(m a) - (I + K/(m a)) (K + m a I)^-1 ] R = I,   as I + K/(m a) = (K + m a I)/(m a).

``Rows`` holds R in one of two ways (``path``), chosen per layer in paths.py:

* "reuse":    the layer input x [m, ...] (repeated to r rows when r > m) and output gradients gy
              [r, ...]; K = plan.gram(x, gy), R g = plan.jvp(x, gy, g), R^T u = plan.vjp(x, gy, u)
              (the paper's reuse, section 3.1).
* "jacobian": R itself, from plan.jacobian(x, gy) flattened to [r, P], or its per-parameter column
              blocks; K = R R^T and the products are matrix-vector products.

``BlockCurvature`` is a block's Rows with K and its Cholesky factor; the distributed exact step keeps
a rank's Rows and puts K's factor on the block's owner (estimator/exact.py).

The Gram matrix, the factor and both products run in float32 at least (float64 when the parameters
are float64), outside autocast. K + m a I is factored with torch.linalg.cholesky_ex; if that fails the
factorisation is retried once with 10 a, and the block then uses 10 a throughout (both the factor and
the 1/a), so d stays the exact damped inverse for the damping it reports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor

from tengrad.codegen.torch_backend import symmetric_gram
from tengrad.optim.curvature import eigenbasis, paths, tokens
from tengrad.optim.errors import TENGraDError


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; anything narrower (bf16, fp16, fp32) is computed in float32."""
    return torch.promote_types(dtype, torch.float32)


class Rows:
    """R [r, P] of one block from a batch of m samples (all tensors detached, compute dtype).

    ``x``: the layer input [m, ...] (reuse path; ``x_rep()`` repeats it to one row per gy row, row
    c*m + i belongs to sample i); ``gy``: output gradients [r, ...]; ``jac``: R [r, P]; or ``pieces``
    and ``scale``: R = scale * [pieces[0] | pieces[1] | ...], each [r, P_i] (the per-parameter
    Jacobians as formed, e.g. J / m from the backward pass: no concatenated or rescaled copy is made).
    """

    __slots__ = ("path", "m", "x", "gy", "jac", "pieces", "scale", "factor", "_x_rep", "prior", "prior_note",
                 "prior_mean", "_bound", "tokens")

    def __init__(self, path: str, m: int, x: Tensor | None = None, gy: Tensor | None = None,
                 jac: Tensor | None = None, pieces: Sequence[Tensor] | None = None, scale: float = 1.0) -> None:
        self.path, self.m, self.x, self.gy, self.jac = path, int(m), x, gy, jac
        self.pieces = None if pieces is None else tuple(p.reshape(p.shape[0], -1) for p in pieces)
        self.scale = float(scale) if pieces is not None else 1.0
        self.factor = 1.0           # R = factor * (the rows as held): a loss scale taken out (build.py)
        self._x_rep = None
        self._bound = None          # (plan, plan.bound(x_rep, gy)): the reuse path's jvp/vjp, checked once
        self.prior = None           # S = D^-1/2 per parameter when these are the rows R S of a prior (prior.py)
        self.prior_note = None      # why a block under a prior keeps the identity prior
        self.prior_mean = None      # the block's mean sqrt(v) behind S (step_rule="adam": prior.py)
        self.tokens = None          # T when these are rows per position (m: the positions; tokens.py)

    @property
    def n_rows(self) -> int:
        if self.gy is not None:
            return self.gy.shape[0]
        return (self.jac if self.jac is not None else self.pieces[0]).shape[0]

    @property
    def explicit_held(self) -> bool:
        return self.jac is not None or self.pieces is not None

    @property
    def reps(self) -> int:
        return self.n_rows // self.m

    def x_rep(self) -> Tensor:
        """x repeated to one row per gy row (the same tensor when r = m)."""
        if self._x_rep is None:
            x, reps = self.x, self.n_rows // self.x.shape[0]
            self._x_rep = x if reps == 1 else x.unsqueeze(0).expand(reps, *x.shape).reshape(reps * x.shape[0],
                                                                                              *x.shape[1:])
        return self._x_rep

    def explicit(self, plan) -> "Rows":
        """The same R, also held as an explicit Jacobian (formed from x and gy; x and gy are kept)."""
        if self.explicit_held:
            return self
        out = Rows("jacobian", self.m, self.x, self.gy, pieces=plan.jacobian(self.x_rep(), self.gy))
        out._copy_marks(self)
        return out

    def _copy_marks(self, other: "Rows") -> None:
        self.factor, self.prior, self.prior_note = other.factor, other.prior, other.prior_note
        self.prior_mean = other.prior_mean
        self.tokens = other.tokens

    def magnitudes_jtu(self, plan, u: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
        """|R|^T u for u >= 0, shaped like ``like``: each entry the sum of the magnitudes of the products
        whose signed sum is that entry of R^T u (every row's J_i is a sum of products of x and gy
        entries): the scale of that sum's rounding (consistency.cancelled). From |J| (or its pieces),
        else from the pre-mapped x and gy by magnitude (``plan.vjp_magnitudes``: |x_hat| of a norm layer)."""
        if self.explicit_held:
            out = Rows(self.path, self.m, jac=None if self.jac is None else self.jac.abs(),
                       pieces=None if self.pieces is None else [p.abs() for p in self.pieces], scale=abs(self.scale))
            out.factor = abs(self.factor)
            return out.jtu(plan, u, like)
        return list(plan.vjp_magnitudes(self.x_rep(), self.gy, u * abs(self.factor)))

    def scaled(self, f: float) -> "Rows":
        """The same rows times ``f`` (no copy of the tensors)."""
        out = Rows(self.path, self.m, self.x, self.gy, self.jac, self.pieces, self.scale)
        out._copy_marks(self)
        out.factor, out._x_rep, out._bound = self.factor * f, self._x_rep, self._bound
        return out

    def factors_only(self) -> "Rows":
        """The same R held as x and gy alone, an explicit J beside them dropped (itself when it holds no
        x or no J): a form that does not depend on the path this rank's batch size chose (the exact
        distributed step puts every rank's rows under one prior, estimator/exact.py)."""
        if self.x is None or self.gy is None or not self.explicit_held:
            return self
        out = Rows(paths.REUSE, self.m, self.x, self.gy)
        out._copy_marks(self)
        out._x_rep = self._x_rep
        return out

    def released(self) -> "Rows":
        """The same R without x and gy when it is held as an explicit J (after K is formed nothing of
        the step reads them: the captured tensors go), else itself."""
        if not self.explicit_held or (self.x is None and self.gy is None):
            return self
        out = Rows(self.path, self.m, jac=self.jac, pieces=self.pieces, scale=self.scale)
        out._copy_marks(self)
        return out

    def sampled(self, idx: Tensor) -> "Rows":
        """The rows of the samples ``idx`` [c] (of this batch's m): m = c, and for r = reps * m rows
        the rows c' m + i, i in idx, for every c' (a copy of those rows; the rest is dropped)."""
        c, reps = int(idx.numel()), self.reps
        rows = idx if reps == 1 else torch.cat([idx + j * self.m for j in range(reps)])
        if self.jac is not None:
            out = Rows(self.path, c, jac=self.jac[rows])
        elif self.pieces is not None:
            out = Rows(self.path, c, pieces=[p[rows] for p in self.pieces], scale=self.scale)
            if self.x is not None:
                out.x, out.gy = self.x[idx], self.gy[rows]
        else:
            out = Rows(self.path, c, self.x[idx], self.gy[rows])
        out._copy_marks(self)
        return out

    def at_positions(self, lead: int, t: int, idx: Tensor | None) -> "Rows":
        """x/gy rows of inputs with ``lead`` leading dims (the sample and T positions) at the flat positions
        ``idx`` [c] (None: all m T): rows per position, gy scaled by sqrt(T) (curvature/tokens.py)."""
        out = Rows("reuse", self.m * t if idx is None else int(idx.numel()), tokens.select(self.x, lead, idx),
                   tokens.select(self.gy, lead, idx, math.sqrt(t)))
        out._copy_marks(self)
        out.tokens = t
        return out

    def transformed(self, prior: Sequence) -> "Rows":
        """R S^T for a prior given per parameter (the rows must be an explicit J): an elementwise s
        (shaped like the parameter: a diagonal S, curvature/prior.py) or an ``eigenbasis.Rotated``; a
        transformed copy of J, carrying ``prior``."""
        if self.pieces is not None:
            out = Rows(self.path, self.m, pieces=eigenbasis.rows_of(prior, self.pieces), scale=self.scale)
        else:
            sizes = [s.numel() if isinstance(s, Tensor) else s.s.numel() for s in prior]
            out = Rows(self.path, self.m, jac=torch.cat(eigenbasis.rows_of(prior, self.jac.split(sizes, dim=1)), dim=1))
        out.factor, out.prior, out.tokens = self.factor, tuple(prior), self.tokens
        return out

    def feature_scaled(self, s_in: Tensor, x_dim: int, s_out: Tensor, gy_dim: int, s: Sequence[Tensor]) -> "Rows":
        """The x/gy rows of x * s_in (on x's dim ``x_dim``) and gy * s_out (on gy's ``gy_dim``): R S for the
        Kronecker-diagonal S = ``s`` (per parameter) that this scaling is for a Linear or a Conv
        (curvature/prior.py), carrying ``prior = s``."""
        def on(v: Tensor, t: Tensor, dim: int) -> Tensor:
            shape = [1] * t.dim()
            shape[dim] = -1
            return t * v.reshape(shape).to(t.dtype)
        out = Rows(self.path, self.m, on(s_in, self.x, x_dim), on(s_out, self.gy, gy_dim))
        out.factor, out.prior, out.tokens = self.factor, tuple(s), self.tokens
        return out

    def matrix(self) -> Tensor:
        """R [r, P] as one tensor (the explicit J; a copy when held as scaled pieces)."""
        if self.jac is not None:
            return self.jac if self.factor == 1.0 else self.jac * self.factor
        return flatten_jacobian(self.pieces, self.scale * self.factor)

    def gram(self, plan) -> Tensor:
        """K = R R^T [r, r]; a large piece's product from its blocks on and above the diagonal."""
        if self.pieces is not None:
            gram = _gram(self.pieces[0])
            for p in self.pieces[1:]:
                gram += _gram(p)
            c = self.scale * self.factor
        else:
            gram = _gram(self.jac) if self.jac is not None else plan.gram(self.x_rep(), self.gy)
            c = self.factor
        if c != 1.0:
            gram *= c * c
        return gram

    def jg(self, plan, g: Sequence[Tensor]) -> Tensor:
        """R g [r] for g shaped like the block's parameters."""
        rg = self._jg(plan, g)
        return rg * self.factor if self.factor != 1.0 else rg

    def _jg(self, plan, g: Sequence[Tensor]) -> Tensor:
        if self.pieces is not None:     # R = scale [P_0 | P_1 | ...]: R g = scale sum_i P_i g_i
            rg = self.pieces[0] @ g[0].reshape(-1).to(self.pieces[0].dtype)
            for p, t in zip(self.pieces[1:], g[1:]):
                rg += p @ t.reshape(-1).to(p.dtype)
            return rg * self.scale if self.scale != 1.0 else rg
        if self.jac is not None:
            flat = g[0].reshape(-1) if len(g) == 1 else torch.cat([t.reshape(-1) for t in g])
            return self.jac @ flat.to(self.jac.dtype)
        return self.bound(plan).jvp(g).reshape(-1)

    def jtu(self, plan, u: Tensor, like: Sequence[Tensor], beta: float | None = None,
            out: Sequence[Tensor | None] | None = None) -> list[Tensor]:
        """R^T u shaped like ``like`` (the block's parameters), in the rows' dtype; with ``beta``:
        R^T u + beta * like (the step's d = g / a + R^T u', formed in R^T u's own product where it is a
        matrix product: one pass over a parameter-sized tensor less), written into ``out`` (buffers
        shaped like ``like`` in the rows' dtype, None entries for fresh tensors) where given."""
        if self.factor != 1.0:
            u = u * self.factor
        outs = [None] * len(like) if out is None or beta is None else list(out)
        if self.pieces is not None:     # R^T u = [P_i^T (scale u)]_i
            us = u * self.scale if self.scale != 1.0 else u
            if beta is None:
                return [(p.T @ us.to(p.dtype)).view(t.shape) for p, t in zip(self.pieces, like)]
            return [torch.addmv(t.reshape(-1).to(p.dtype), p.T, us.to(p.dtype), beta=beta,
                                out=None if o is None else o.view(-1)).view(t.shape)
                    for p, t, o in zip(self.pieces, like, outs)]
        if self.jac is not None:
            if beta is not None and len(like) == 1:
                t, o = like[0], outs[0]
                return [torch.addmv(t.reshape(-1).to(self.jac.dtype), self.jac.T, u.to(self.jac.dtype), beta=beta,
                                    out=None if o is None else o.view(-1)).view(t.shape)]
            flat = self.jac.T @ u.to(self.jac.dtype)
            back, start = [], 0
            for t in like:
                piece = flat[start:start + t.numel()].view(t.shape)
                back.append(piece if beta is None else piece.add_(t.to(piece.dtype), alpha=beta))
                start += t.numel()
            return back
        if beta is None:
            return list(self.bound(plan).vjp(u))
        return list(self.bound(plan).vjp(u, like, beta, outs))

    def bound(self, plan):
        """``plan.bound`` on these x and gy, made once (the x/gy rows are not changed in place once kept)."""
        if self._bound is None or self._bound[0] is not plan:
            self._bound = (plan, plan.bound(self.x_rep(), self.gy))
        return self._bound[1]

    def tensors(self) -> dict[str, Tensor | None]:
        """What a checkpoint keeps: x (repeated to r rows) and gy, or "jac": R / scale (pieces side by side)."""
        if self.path == "jacobian":
            jac = self.jac if self.pieces is None else flatten_jacobian(self.pieces)
            return {"x": None, "gy": None, "jac": jac if self.factor == 1.0 else jac * self.factor}
        return {"x": self.x_rep(), "gy": self.gy if self.factor == 1.0 else self.gy * self.factor, "jac": None}

    def split(self) -> list[int] | None:
        """The pieces' column counts (None: R is held whole)."""
        return None if self.pieces is None else [p.shape[1] for p in self.pieces]


@dataclass(frozen=True)
class BlockCurvature:
    """What one block keeps from its curvature batch: R (``rows``), K [r, r] (``gram``) and
    L with L L^T = K + m a I (``chol``); ``damping``: the a in ``chol`` (10x ``requested`` after a
    retry); ``requested``: the damping asked for when ``chol`` was made (a later change of the group's
    damping refactors K)."""

    rows: Rows
    gram: Tensor
    chol: Tensor
    damping: float
    requested: float

    # the rows' fields, read through (checkpoints, explain, tests)
    path = property(lambda self: self.rows.path)
    m = property(lambda self: self.rows.m)
    x = property(lambda self: self.rows.x)
    gy = property(lambda self: self.rows.gy)
    jac = property(lambda self: self.rows.jac)
    pieces = property(lambda self: self.rows.pieces)
    scale = property(lambda self: self.rows.scale)

    def tensors(self) -> dict[str, Tensor | None]:
        """The rows' tensors, K and L; L is a view into the step's stacked factors (batched.py) and is
        copied, so that a checkpoint entry owns its storage (saved alone, checked alone)."""
        chol = self.chol if self.chol._base is None else self.chol.clone()
        return dict(self.rows.tensors(), gram=self.gram, chol=chol)

    def split(self) -> list[int] | None:
        return self.rows.split()

    def state(self) -> dict:
        """The checkpoint entry (checkpoint.py checks it on load and rebuilds it, ``_curvature``)."""
        return dict(self.tensors(), path=self.path, m=self.m, damping=self.damping, requested=self.requested,
                    jac_split=self.split(), jac_scale=self.scale,
                    prior=None if self.rows.prior is None else [
                        s.state() if isinstance(s, eigenbasis.Rotated) else s for s in self.rows.prior],
                    prior_mean=self.rows.prior_mean, tokens=self.rows.tokens)


def non_finite_gram(layer: str) -> TENGraDError:
    return TENGraDError(f"layer {layer!r}: the Gram matrix J J^T has non-finite entries")


def factor_failed(layer: str, damping: float, m: int) -> TENGraDError:
    return TENGraDError(f"layer {layer!r}: Cholesky of K + m*damping*I failed even with 10x damping "
                        f"(damping={damping}, m={m}); increase the damping")


def factor(gram: Tensor, m: int, damping: float, layer: str) -> tuple[Tensor, float]:
    """(L, a) with L L^T = K + m a I; retries once with 10 a, else raises naming the layer
    (batched.factor_all: the same for many blocks at once)."""
    if not torch.isfinite(gram).all():
        raise non_finite_gram(layer)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for a in (damping, 10.0 * damping):
        chol, info = torch.linalg.cholesky_ex(gram + (m * a) * eye)
        if int(info) == 0:
            return chol, a
    raise factor_failed(layer, damping, m)


def curvature(rows: Rows, plan, damping: float, layer: str) -> BlockCurvature:
    """K from the rows and its damped factor."""
    gram = rows.gram(plan)
    chol, a = factor(gram, rows.m, damping, layer)
    return BlockCurvature(rows, gram, chol, a, damping)


def _gram(j: Tensor) -> Tensor:
    """j j^T; from the blocks on and above the diagonal when j is large (below 2^18 elements one
    product: every extra op costs a parallel region)."""
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


def solve(chol: Tensor, rg: Tensor) -> Tensor:
    """u = (K + m a I)^-1 R g from the factor L [r, r] and R g [r]."""
    return torch.cholesky_solve(rg.reshape(-1, 1).to(chol.dtype), chol).reshape(-1)


def direction(curv: BlockCurvature, plan, g: Sequence[Tensor], layer: str) -> list[Tensor]:
    """d = (1/a)(g - R^T (K + m a I)^-1 R g) for g shaped like the block's params (compute dtype).

    Finiteness is not checked here: the optimizer checks every direction of a step at once.
    """
    s = curv.rows.prior              # rows R S^T of a prior (prior.py, eigenbasis.py): g' = S g, d = S^T d'
    if s is not None:
        g = eigenbasis.into(s, g)
    u = solve(curv.chol, curv.rows.jg(plan, g))
    # d = g / a + R^T (-u / a): the -1/a rides on the r-vector u, so d is one pass over the parameters
    back = curv.rows.jtu(plan, u * (-1.0 / curv.damping), g)
    inv_a = 1.0 / curv.damping
    d = [bi.to(gi.dtype).add_(gi, alpha=inv_a) for gi, bi in zip(g, back)]   # in place on b: no allocation
    if s is not None:
        eigenbasis.out_of_(s, d)
    return d
