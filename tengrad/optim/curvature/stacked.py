"""R g and d = beta g + R^T u for many small explicit-Jacobian blocks in a few operations.

A block b that keeps its rows as an explicit J, R_b [r, P_b] (woodbury.Rows, path "jacobian"), costs
two mat-vecs per step: R_b g_b and R_b^T u_b. For a small block (a norm's affine, a bias, a thin conv)
these take microseconds, and the Python and dispatch around them (reshapes, dtype checks, one addmv
per parameter) take ten times that: a ResNet's 20 BatchNorm blocks cost more in a reuse step than its
largest conv. So the blocks with the same r, dtype and device, no prior and at most ``SMALL`` elements
of R each are copied, once per set of rows (a curvature step), into *runs*: the blocks of one width
P (a model repeats its widths: ViT-tiny's 25 LayerNorms, its 12 attention projections) side by side
in one contiguous tensor

    J_run [k, r, P]          J_run[j] = f_b R_b     (the run's j-th block b)

(f_b: the rows' loss-scale factor times the pieces' scale, folded into the copy). Per step, with G the
blocks' g side by side in run order (one cat; G_run [k, P] a view of it):

    R g      Y_run[j, i] = sum_c G_run[j, c] J_run[j, i, c]           one bmm per run
    d        D_run[j, c] = beta_j G_run[j, c] + sum_i u_j[i] J_run[j, i, c]   one baddbmm per run

and D split back into the parameters' shapes (views of one tensor). J is kept as rows [r, P] (not
J^T [P, r]): the products then run along contiguous rows of P (ViT-tiny's projection block, P = 37k,
r = 3: the addmv on J^T [P, 3] took 92 us against 42 us on J [3, P]; the 13 blocks of its width as one
baddbmm 170 us against 750 us for their addmvs). Per-block beta: one beta per run when they agree
(one damping), else beta (g + J^T (u / beta)) with the scale after.

Memory: the copy of the small blocks' rows, at most B * SMALL elements (``Stack.nbytes``); the rows keep
their own tensors too (checkpoints, explain()). Exact: the same sums in another order (float rounding
only).
"""
from __future__ import annotations

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
    """The rows of blocks b = 0..B-1 in runs of one width (module docstring). ``rows``: each block's Rows
    (all ``stackable``, with the same row count, dtype and device); ``shapes``: each block's parameter
    shapes (the columns of its R in that order)."""

    def __init__(self, rows: Sequence[Rows], shapes: Sequence[Sequence[torch.Size]]) -> None:
        self.rows = list(rows)
        self.shapes = [list(s) for s in shapes]
        sizes = [[int(torch.Size(s).numel()) for s in ss] for ss in self.shapes]
        widths = [sum(ss) for ss in sizes]
        first = self.rows[0]
        src = first.jac if first.jac is not None else first.pieces[0]
        r = first.n_rows
        by_width: dict[int, list[int]] = {}
        for b, w in enumerate(widths):
            by_width.setdefault(w, []).append(b)
        #: per run: (its blocks in order, width P, J_run [k, r, P])
        self.runs: list[tuple[list[int], int, Tensor]] = []
        for w, blocks in by_width.items():
            jr = src.new_empty(len(blocks), r, w)
            for j, b in enumerate(blocks):
                rw = self.rows[b]
                parts = [rw.jac] if rw.jac is not None else list(rw.pieces)
                if rw.n_rows != r or sum(p.shape[1] for p in parts) != w:
                    raise ValueError(f"stacked block {b}: R is {rw.n_rows} x {sum(p.shape[1] for p in parts)}, "
                                     f"expected {r} x {w} (one row count; the parameters' sizes)")
                f = rw.factor * (rw.scale if rw.pieces is not None else 1.0)
                at = 0
                for p in parts:
                    dst = jr[j, :, at:at + p.shape[1]]
                    if f != 1.0:
                        torch.mul(p, f, out=dst)
                    else:
                        dst.copy_(p)
                    at += p.shape[1]
            self.runs.append((blocks, w, jr))
        self._order = [b for blocks, _, _ in self.runs for b in blocks]      # G's block order
        self._where = torch.tensor([self._order.index(b) for b in range(len(self.rows))], device=src.device)
        self._sizes = [n for b in self._order for n in sizes[b]]

    def holds(self, rows: Sequence[Rows]) -> bool:
        """Whether this stack was made from exactly these rows objects, in this order."""
        return len(rows) == len(self.rows) and all(a is b for a, b in zip(rows, self.rows))

    @property
    def nbytes(self) -> int:
        return sum(jr.numel() * jr.element_size() for _, _, jr in self.runs)

    @property
    def dtype(self) -> torch.dtype:
        return self.runs[0][2].dtype

    @property
    def device(self) -> torch.device:
        return self.runs[0][2].device

    def flat(self, gs: Sequence[Sequence[Tensor]]) -> Tensor:
        """G [N]: the blocks' g (per block, one tensor per parameter) side by side in run order, in J's dtype."""
        return torch.cat([t.reshape(-1) for b in self._order for t in gs[b]]).to(self.dtype)

    def _views(self, flat: Tensor) -> list[Tensor]:
        """``flat`` [N] in run order as [k, P] per run."""
        out, at = [], 0
        for blocks, w, _ in self.runs:
            out.append(flat[at:at + len(blocks) * w].view(len(blocks), w))
            at += len(blocks) * w
        return out

    def jg(self, g: Tensor) -> Tensor:
        """R_b g_b of every block, [B, r] (row b: block b), for G [N] from ``flat``."""
        # as [k, 1, P] x [k, P, r] (J's transpose view): bmm of J [k, r, P] with g [k, P, 1] took 9x longer
        ys = [torch.bmm(gr.unsqueeze(1), jr.transpose(1, 2)).squeeze(1)
              for (_, _, jr), gr in zip(self.runs, self._views(g))]
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
        return y if len(ys) == 1 and self._order == list(range(len(self.rows))) else y[self._where]

    def direction(self, g: Tensor, u: Tensor, beta: Sequence[float]) -> list[list[Tensor]]:
        """d_b = beta_b g_b + R_b^T u_b of every block as views shaped like its parameters; G [N] from
        ``flat``, u [B, r], ``beta``: B numbers (1 / damping of each block's group)."""
        d = torch.empty_like(g)
        u = u.to(self.dtype)
        for (blocks, _, jr), gr, dr in zip(self.runs, self._views(g), self._views(d)):
            betas = [float(beta[b]) for b in blocks]
            ur = u[blocks].unsqueeze(1)                                  # [k, 1, r]
            if all(x == betas[0] for x in betas):
                torch.baddbmm(gr.unsqueeze(1), ur, jr, beta=betas[0], out=dr.unsqueeze(1))
            else:                                                        # beta (g + J^T (u / beta))
                scale = torch.tensor(betas, dtype=self.dtype, device=u.device).view(-1, 1, 1)
                torch.baddbmm(gr.unsqueeze(1), ur / scale, jr, out=dr.unsqueeze(1))
                dr.mul_(scale.view(-1, 1))
        pieces = iter(d.split(self._sizes))
        views = {b: [next(pieces).view(s) for s in self.shapes[b]] for b in self._order}
        return [views[b] for b in range(len(self.rows))]
