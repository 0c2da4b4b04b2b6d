"""R g and d = beta g + R^T u for many small explicit-Jacobian blocks in a few operations.

A block b that keeps its rows as an explicit J, R_b [r, P_b] (woodbury.Rows, path "jacobian"), costs
two mat-vecs per step: R_b g_b and R_b^T u_b. For a small block (a norm's affine, a bias, a thin conv)
these take microseconds, and the Python and dispatch around them (reshapes, dtype checks, one addmv
per parameter) take ten times that: a ResNet's 20 BatchNorm blocks cost more in a reuse step than its
largest conv. So the blocks with the same r, dtype and device, no prior and at most ``SMALL`` elements
of R each are copied side by side into one contiguous

    J^T [N, r],  N = sum_b P_b         rows of block b: J^T[o_b : o_b + P_b] = f_b R_b^T
    s [N]                              s[c] = the block of column c of J

(f_b: the rows' loss-scale factor times the pieces' scale, folded into the copy), made once per set of
rows (a curvature step) and then per step, with G [N] the blocks' g side by side (one cat):

    R g      Y[b, i] = sum_{c: s[c] = b} G[c] J[i, c] = (S_G J^T)[b, i]   S_G [B, N] sparse (CSR): row b
                                                                 holds G on block b's columns
    d        D[o_b : o_b + P_b] = beta_b G_b + J^T_b u_b    one addmv per block into D's slice

and D split back into the parameters' shapes (views of one tensor). S_G's structure (row pointers: the
blocks' offsets; column c in row s[c]) is made once, its values are G itself, so R g is one sparse-dense
product that reads J once and forms no [N, r] temporary (J^T * G and an index_add_ of its rows took
2.4 ms against 0.15 ms for a ResNet's 33 small blocks, 2 threads). d is one addmv per block on J^T's
contiguous rows [P_b, r], g / a added in the product: the gather of U's rows by s and a sum over r
(J^T * U[s], summed over its r columns) took 10.8 ms for ViT-tiny's stack at r = 3 (a reduction over
3 elements per row), the addmvs about 0.5 ms. Both read J once, as the per-block mat-vecs do; ``SMALL``
keeps N r in cache.

Memory: the copy of the small blocks' rows, at most B * SMALL elements (``Stack.nbytes``); the rows keep
their own tensors too (checkpoints, explain()). Exact: the same sums in another order (float rounding
only).
"""
from __future__ import annotations

import itertools
import warnings
from typing import Sequence

import torch
from torch import Tensor

from tengrad.optim.curvature.woodbury import Rows

#: a block's explicit R of at most this many elements (512 KiB in float32) joins the stack
SMALL = 1 << 17


def stackable(rows: Rows) -> bool:
    """Whether a block with these rows can join a stack: an explicit R, no prior, at most SMALL elements."""
    if not rows.explicit_held or rows.prior is not None:
        return False
    cols = rows.jac.shape[1] if rows.jac is not None else sum(p.shape[1] for p in rows.pieces)
    return rows.n_rows * cols <= SMALL


class Stack:
    """The rows of blocks b = 0..B-1 side by side (module docstring). ``rows``: each block's Rows (all
    ``stackable``, with the same row count, dtype and device); ``shapes``: each block's parameter shapes
    (the columns of its R in that order)."""

    def __init__(self, rows: Sequence[Rows], shapes: Sequence[Sequence[torch.Size]]) -> None:
        self.rows = list(rows)
        self.shapes = [list(s) for s in shapes]
        sizes = [[int(torch.Size(s).numel()) for s in ss] for ss in self.shapes]
        self.sizes = [n for ss in sizes for n in ss]
        widths = [sum(ss) for ss in sizes]
        first = self.rows[0]
        src = first.jac if first.jac is not None else first.pieces[0]
        r, n = first.n_rows, sum(widths)
        self.jt = src.new_empty(n, r)
        start = 0
        for b, (rw, w) in enumerate(zip(self.rows, widths)):
            parts = [rw.jac] if rw.jac is not None else list(rw.pieces)
            if rw.n_rows != r or sum(p.shape[1] for p in parts) != w:
                raise ValueError(f"stacked block {b}: R is {rw.n_rows} x {sum(p.shape[1] for p in parts)}, "
                                 f"expected {r} x {w} (one row count; the parameters' sizes)")
            f = rw.factor * (rw.scale if rw.pieces is not None else 1.0)
            for p in parts:
                dst = self.jt[start:start + p.shape[1]]
                if f != 1.0:
                    torch.mul(p.T, f, out=dst)
                else:
                    dst.copy_(p.T)
                start += p.shape[1]
        counts = torch.tensor(widths, device=src.device)
        self._crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])    # S_G's structure (module docstring)
        self._col = torch.arange(n, device=src.device)
        offsets = [0, *itertools.accumulate(widths[:-1])]
        self._spans = list(zip(offsets, widths))                   # block b's columns: [o, o + w)
        self._jts = [self.jt[o:o + w] for o, w in self._spans]       # its rows of J^T, [P_b, r]

    def holds(self, rows: Sequence[Rows]) -> bool:
        """Whether this stack was made from exactly these rows objects, in this order."""
        return len(rows) == len(self.rows) and all(a is b for a, b in zip(rows, self.rows))

    @property
    def nbytes(self) -> int:
        return self.jt.numel() * self.jt.element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self.jt.dtype

    @property
    def device(self) -> torch.device:
        return self.jt.device

    def flat(self, gs: Sequence[Sequence[Tensor]]) -> Tensor:
        """G [N]: the blocks' g (per block, one tensor per parameter) side by side, in J's dtype."""
        return torch.cat([t.reshape(-1) for g in gs for t in g]).to(self.jt.dtype)

    def jg(self, g: Tensor) -> Tensor:
        """R_b g_b of every block, [B, r] (row b: block b), for G [N] from ``flat``."""
        with warnings.catch_warnings():     # torch warns once that sparse CSR support is in beta
            warnings.simplefilter("ignore", UserWarning)
            s_g = torch.sparse_csr_tensor(self._crow, self._col, g, (len(self.rows), g.shape[0]),
                                          check_invariants=False)
        return s_g @ self.jt

    def direction(self, g: Tensor, u: Tensor, beta: Sequence[float]) -> list[list[Tensor]]:
        """d_b = beta_b g_b + R_b^T u_b of every block as views shaped like its parameters; G [N] from
        ``flat``, u [B, r], ``beta``: B numbers (1 / damping of each block's group)."""
        d = torch.empty_like(g)
        u = u.to(self.jt.dtype)
        for b, (o, w) in enumerate(self._spans):
            torch.addmv(g[o:o + w], self._jts[b], u[b], beta=float(beta[b]), out=d[o:o + w])
        pieces = iter(d.split(self.sizes))
        return [[next(pieces).view(s) for s in ss] for ss in self.shapes]
