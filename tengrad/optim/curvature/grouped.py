"""R g and d = beta g + R^T u for reuse-path blocks of one shape, as one batched contraction each.

A block b on the reuse path (woodbury.Rows, path "reuse": its layer input X_b and output gradients G_b)
runs its plan's J p and J^T u orders every step: a few contractions per term (weight, bias), each a
matrix product for a Linear. A Transformer has many blocks of the same shape (ViT-tiny: 12 qkv, 12
proj, 12 fc1, 12 fc2 Linears), and at a few rows each product is short, so the Python and dispatch
around it (the einsum's role analysis, reshapes, one call per term and block) cost as much as the
product. Blocks whose terms have the same spec, the same chosen orders and the same X and G shapes
(and dtype and device) run together: with a new leading index b over the B blocks of a group,

    X[b, ...] = X_b,  G[b, ...] = G_b              stacked once per set of rows (a curvature step)
    p[b, ...] = g_b                                stacked per step (one copy of the group's gradients)
    (J p)[b, n]    = the order's contractions, each with b as one more batch index      (J_b g_b)
    d[b, ...]      = beta_b g_b + sum_n u[b, n] J_b[n, ...]   (the last product a baddbmm)

so a step's Python is per group and term, not per block. The steps of both orders must all be
contractions (``Contract``; a convolution's steps are not batched here) and the plan's backend torch.
Each block's loss-scale factor f_b (``Rows.factor``: R = f_b * the rows as held) scales J p's rows and u.
Exact: the same sums in another order.

Memory: the stacks copy X and G of the grouped blocks (the rows keep their own tensors too:
checkpoints, explain()); only blocks with at most ``SMALL`` elements of X and G join, where the
per-block overhead matters (a long product hides it), so the copy is at most B * SMALL elements.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tengrad.codegen.einsum import Add, contract
from tengrad.optim.curvature import scratch
from tengrad.optim.curvature.woodbury import Rows
from tengrad_ir import steps as S

#: a block joins a group when its bound X and G have at most this many elements together (4 MiB in float32)
SMALL = 1 << 20

#: the index over the blocks of a group (not a letter any spec uses: specs name indices with letters)
BLOCK = "#b"


def key(rows: Rows, plan) -> tuple | None:
    """What blocks must share to run together (module docstring), or None when this one cannot join."""
    if plan is None or rows.path != "reuse" or rows.explicit_held or rows.gy is None:
        return None
    if getattr(plan, "backend", None) != "torch":
        return None
    bound = rows.bound(plan)
    parts = []
    numel = 0
    for run, jvp, vjp in bound.terms:
        if not all(type(s) is S.Contract for s in jvp.steps + vjp.steps):
            return None
        x = run.x
        numel += run.g.numel() + (0 if x is None else x.numel())
        parts.append((run.spec, jvp.name, vjp.name, None if x is None else tuple(x.shape), tuple(run.g.shape)))
    if numel > SMALL:
        return None
    try:
        hash(tuple(parts))
    except TypeError:           # a spec that cannot be compared: the block runs alone
        return None
    return tuple(parts), rows.gy.dtype, rows.gy.device


class Group:
    """Reuse-path blocks b = 0..B-1 with one ``key``: ``rows`` (each block's Rows) and ``plans`` (their
    compiled layers, whose parameters are the columns of the rows, in order)."""

    def __init__(self, rows: Sequence[Rows], plans: Sequence) -> None:
        self.rows = list(rows)
        bounds = [r.bound(p) for r, p in zip(self.rows, plans)]
        first = bounds[0]
        self.dtype = first.dtype
        self.shapes = list(first.shapes)
        self.terms = []             # per term: (X [B, ...] or None, G [B, ...], jvp order, vjp order, sizes,
        stacks: dict[tuple, Tensor] = {}    # param shape); one stack per distinct set of tensors (weight
        for j, (run, jvp, vjp) in enumerate(first.terms):          # and bias share G)
            xs = None if run.x is None else _stack([b.terms[j][0].x for b in bounds], stacks)
            gs = _stack([b.terms[j][0].g for b in bounds], stacks)
            self.terms.append((xs, gs, jvp, vjp, run.sizes, [run.sizes[i] for i in run.spec.param_indices]))
        factors = [r.factor for r in self.rows]
        self._f = None if all(f == 1.0 for f in factors) else torch.tensor(factors, dtype=self.dtype,
                                                                           device=first.terms[0][0].g.device)
        self._out: list[Tensor | None] = [None] * len(self.terms)
        self._p: list[Tensor | None] = [None] * len(self.terms)     # the stacked g per term (``stack``)

    def holds(self, rows: Sequence[Rows]) -> bool:
        """Whether this group was made from exactly these rows objects, in this order."""
        return len(rows) == len(self.rows) and all(a is b for a, b in zip(rows, self.rows))

    @property
    def nbytes(self) -> int:
        seen, n = set(), 0
        for xs, gs, *_ in self.terms:
            for t in (xs, gs):
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    n += t.numel() * t.element_size()
        return n

    def stack(self, gs: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        """The blocks' g per term, [B, *param shape] each (g per block: one tensor per parameter), copied
        into buffers kept across steps (a fresh one is a new allocation the copy page-faults into; the
        stack is read only within the step that made it)."""
        out = []
        for j in range(len(self.terms)):
            parts = [g[j] if g[j].dtype == self.dtype else g[j].to(self.dtype) for g in gs]
            shape = (len(parts), *parts[0].shape)
            buf = self._p[j]
            if buf is None or buf.shape != shape or buf.device != parts[0].device:
                buf = self._p[j] = parts[0].new_empty(shape)
            out.append(torch.stack(parts, out=buf))
        return out

    @staticmethod
    def squares(p: Sequence[Tensor]) -> Tensor:
        """|g_b|^2 of every block, float64 [B], for ``p`` from ``stack`` (read right after the copy)."""
        return sum(torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).to(torch.float64).square()
                   for t in p)

    def jg(self, p: Sequence[Tensor]) -> Tensor:
        """R_b g_b of every block, [B, r], for ``p`` from ``stack``."""
        out = None
        for (xs, gs, jvp, _, sizes, pshape), pt in zip(self.terms, p):
            env = {"X": xs, "G": gs, "p": pt.reshape(len(self.rows), *pshape)}
            y = _run(jvp, env, sizes)
            out = y if out is None else out.add_(y)
        return out if self._f is None else out.mul_(self._f.unsqueeze(1))

    def direction(self, p: Sequence[Tensor], u: Tensor, beta: Sequence[float]) -> list[list[Tensor]]:
        """d_b = beta_b g_b + R_b^T u_b of every block, views shaped like its parameters; ``p`` from
        ``stack``, u [B, r], ``beta``: B numbers (1 / damping; they differ only across param groups)."""
        u = u.to(self.dtype)
        if self._f is not None:
            u = u * self._f.unsqueeze(1)
        same = all(b == beta[0] for b in beta)
        if not same:                        # beta g + J^T u = beta (g + J^T (u / beta)): one beta per block
            scale = torch.tensor([float(b) for b in beta], dtype=self.dtype, device=u.device)
            u = u / scale.unsqueeze(1)
        outs = []
        for j, ((xs, gs, _, vjp, sizes, pshape), pt) in enumerate(zip(self.terms, p)):
            shape = (len(self.rows), *pshape)
            if self._out[j] is None or self._out[j].shape != shape:   # kept: views of it must be copied
                self._out[j] = scratch.keep(pt.new_empty(shape))       # before a momentum buffer adopts one
            add = Add(pt.reshape(shape), float(beta[0]) if same else 1.0, self._out[j])
            d = _run(vjp, {"X": xs, "G": gs, "u": u}, sizes, add)
            if not same:
                d.mul_(scale.to(d.dtype).reshape(-1, *[1] * (d.dim() - 1)))
            outs.append(d.reshape(len(self.rows), *self.shapes[j]))
        return [[o[b] for o in outs] for b in range(len(self.rows))]


def _stack(tensors: list[Tensor], made: dict) -> Tensor:
    """torch.stack(tensors), made once per distinct list of tensors (``made``: by their ids)."""
    k = tuple(map(id, tensors))
    if k not in made:
        made[k] = torch.stack(tensors)
    return made[k]


def _run(order, env: dict, sizes: dict, add: Add | None = None) -> Tensor:
    """The order's contractions with the block index leading every operand and result (``add``: beta c
    added in the last one, c laid out like its result)."""
    last = order.steps[-1]
    for step in order.steps:
        ops = [(env[S.base(t.name)], (BLOCK,) + tuple(t.indices)) for t in step.inputs]
        a = None
        if step is last and add is not None:
            a = add.reshaped([add.c.shape[0]] + [sizes[i] for i in step.out.indices])
        env[step.out.name] = contract((BLOCK,) + tuple(step.out.indices), *ops, add=a)
    return env[last.out.name]
