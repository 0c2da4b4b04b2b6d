"""The Woodbury solves of many blocks at once (woodbury.py's ``factor`` and ``solve``, batched).

Blocks b = 1..B with r_b rows from a batch of m_b samples and damping a_b each need

    L_b L_b^T = K_b + m_b a_b I        [r_b, r_b]   (the factor, on a curvature step or a damping change)
    u_b = (K_b + m_b a_b I)^-1 R_b g_b [r_b]        (every step)

Blocks with the same r, dtype and device form one group: their K's stack into [B, r, r], factored by
one ``torch.linalg.cholesky_ex``, and their R g's into [B, r, 1], solved by one ``torch.cholesky_solve``
against the stacked factors (kept between steps by ``Solver`` while the factors are the same objects).

Same semantics as the per-block ``woodbury.factor``: K with a non-finite entry raises naming the
block; a block whose factorisation fails is retried once with 10 a_b (the blocks that failed, batched
again) and then uses 10 a_b throughout; a block failing both raises naming it. The other blocks are
unaffected by one block's retry.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tengrad.optim.curvature.woodbury import factor_failed, non_finite_gram


def _groups(tensors: Sequence[Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``tensors`` grouped by (shape, dtype, device), in order of first appearance."""
    out: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((tuple(t.shape), t.dtype, t.device), []).append(i)
    return out


def _damped(grams: Tensor, shifts: Sequence[float]) -> Tensor:
    """K_b + s_b I for a stack K [B, r, r] and shifts s_b = m_b a_b."""
    s = torch.tensor(list(shifts), dtype=grams.dtype, device=grams.device)
    out = grams.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(s.unsqueeze(-1))
    return out


def factor_all(grams: Sequence[Tensor], ms: Sequence[int], dampings: Sequence[float],
               layers: Sequence[str]) -> list[tuple[Tensor, float]]:
    """[(L_b, a_b used)] with L_b L_b^T = K_b + m_b a_b I for every block (module docstring)."""
    out: list[tuple[Tensor, float] | None] = [None] * len(grams)
    for idx in _groups(grams).values():
        stack = torch.stack([grams[i] for i in idx]) if len(idx) > 1 else grams[idx[0]].unsqueeze(0)
        finite = torch.isfinite(stack).flatten(1).all(1).tolist()
        if not all(finite):
            raise non_finite_gram(layers[idx[finite.index(False)]])
        todo = list(range(len(idx)))               # positions in the stack still to factor
        for tries in (1.0, 10.0):
            sub = stack if len(todo) == len(idx) else stack[todo]
            chol, info = torch.linalg.cholesky_ex(_damped(sub, [ms[idx[j]] * dampings[idx[j]] * tries
                                                                for j in todo]))
            failed = []
            for k, (j, bad) in enumerate(zip(todo, info.tolist())):
                if bad:
                    failed.append(j)
                else:
                    out[idx[j]] = (chol[k], dampings[idx[j]] * tries)
            todo = failed
            if not todo:
                break
        if todo:
            i = idx[todo[0]]
            raise factor_failed(layers[i], dampings[i], ms[i])
    return out


class Solver:
    """u_b = (K_b + m_b a_b I)^-1 R_b g_b for all blocks, one ``cholesky_solve`` per group; the stacked
    factors of a group are kept while the same factor objects come again (reuse steps)."""

    def __init__(self) -> None:
        self._stacks: dict[tuple, tuple[list[Tensor], Tensor]] = {}

    def solve(self, chols: Sequence[Tensor], rgs: Sequence[Tensor],
              scales: Sequence[float] | None = None) -> list[Tensor]:
        """[c_b u_b [r_b]] for factors L_b [r_b, r_b], right-hand sides R_b g_b [r_b] and ``scales`` c_b
        (default 1; the step passes -1/a_b, so that d_b = g_b / a_b + R_b^T (c_b u_b))."""
        return self.solve_with_products(chols, rgs, scales)[0]

    def solve_with_products(self, chols: Sequence[Tensor], rgs: Sequence[Tensor],
                            scales: Sequence[float] | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """``solve`` and, per block, (c_b u_b)^T (R_b g_b) as a float64 scalar (one product per group): the
        part of <d_b, g_b> = g_b^T g_b / a_b + (c_b u_b)^T R_b g_b that the rows add (update.Known)."""
        out: list[Tensor | None] = [None] * len(chols)
        products: list[Tensor | None] = [None] * len(chols)
        stacks = {}
        for key, idx in _groups(chols).items():
            group = [chols[i] for i in idx]
            kept = self._stacks.get(key)
            if kept is not None and len(kept[0]) == len(group) and all(a is b for a, b in zip(kept[0], group)):
                stacked = kept[1]
            else:
                stacked = torch.stack(group)
            stacks[key] = (group, stacked)
            rhs = torch.stack([rgs[i].reshape(-1).to(stacked.dtype) for i in idx]).unsqueeze(-1)
            u = torch.cholesky_solve(rhs, stacked).squeeze(-1)
            if scales is not None:
                u = u * torch.tensor([scales[i] for i in idx], dtype=u.dtype, device=u.device).unsqueeze(-1)
            ur = (u.to(torch.float64) * rhs.squeeze(-1).to(torch.float64)).sum(-1)
            for k, i in enumerate(idx):
                out[i], products[i] = u[k], ur[k]
        self._stacks = stacks
        return out, products
