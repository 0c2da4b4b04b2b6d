"""Whether a block took part in this step's forward and backward, and why not.

A block is *skipped* (no direction, no momentum update, no weight decay, kept curvature untouched,
like ``torch.optim.SGD`` skips a parameter whose ``grad`` is None) when its module took no part:

* every parameter's ``grad`` is None (``zero_grad()`` sets them to None and nothing reached them), or
* no forward call of the module received an output gradient since the last step (no capture) and
  every gradient is exactly zero: ``zero_grad(set_to_none=False)`` with a head or branch unused in
  this forward (multi-head or conditional models).

On reuse steps (update_freq > 1, no capture is armed) the second rule reads "every gradient is zero".
A module with a non-zero gradient but no captured forward is still an error (optimizer.py): its
forward was not recorded, so its curvature cannot be built.
The reason goes to ``opt.skipped[block name]`` and ``opt.explain()``.

A gradient made by this step's backward (``Seen``: not the tensor the last step saw) took part, and
its values are not read: autograd makes a new ``.grad`` only for a parameter it reached (after
``zero_grad()``, which sets them to None, or when the old one is shared), and accumulates into a kept
one in place. So in the usual loop (``zero_grad()`` to None) a reuse step reads no gradient here, and
a module that took part with an exactly zero gradient is stepped, as SGD steps it; only a gradient
kept from an earlier step (``zero_grad(set_to_none=False)``, accumulation) has its values checked.
"""
from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch import Tensor


class Seen:
    """The gradients the last step saw, by weak reference (nothing is kept alive): ``made(p)``, whether
    p.grad is another tensor than the one seen then (a new one: this backward made it)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def made(self, p: Tensor) -> bool:
        ref = self._refs.get(id(p))
        return ref is None or ref() is not p.grad

    def remember(self, grads: dict[int, Tensor]) -> None:
        """{id(param): its grad} seen at this step; the others are forgotten."""
        self._refs = {k: weakref.ref(g) for k, g in grads.items()}


NO_GRADIENT = "no gradient (its module took no part in this forward/backward)"
ZERO_GRADIENT = "zero gradient and no captured forward (its module took no part in this forward)"


def unused(params: Sequence[Tensor], record) -> str | None:
    """Why the block should be skipped, or None when it takes part in this step."""
    return unused_all([(params, record)])[0]


def unused_all(blocks: Sequence[tuple[Sequence[Tensor], object]], seen: Seen | None = None) -> list[str | None]:
    """``unused`` of every (params, record) at once: the blocks with no captured forward (every block
    on a reuse step) and no gradient made by this backward (``seen``; None: every gradient counts as
    kept) have their gradients' heads checked for a non-zero entry in one multi-tensor pass and one host
    sync (``_nonzero_all``), not one ``any`` and sync per block. ``seen`` then remembers this step's."""
    why: list[str | None] = [None] * len(blocks)
    check: list[tuple[int, list[Tensor]]] = []
    now: dict[int, Tensor] = {}
    for k, (params, record) in enumerate(blocks):
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            why[k] = NO_GRADIENT
            continue
        made = False
        if seen is not None:
            for p in params:
                if p.grad is not None:
                    made = seen.made(p) or made
                    now[id(p)] = p.grad
        if not (made or (record is not None and (record.grad is not None or record.rows))):
            check.append((k, grads))
    if seen is not None:
        seen.remember(now)
    if check:
        flags = _nonzero_all([g for _, grads in check for g in grads])
        start = 0
        for k, grads in check:
            if not any(flags[start:start + len(grads)]):
                why[k] = ZERO_GRADIENT
            start += len(grads)
    return why


def _nonzero_all(grads: Sequence[Tensor], head: int = 4096) -> list[bool]:
    """Whether each gradient has a non-zero (or NaN) entry. The first ``head`` entries of every dense
    contiguous gradient are read at once (one multi-tensor max |g| and one host sync; a gradient that took
    part almost always has a non-zero entry there, so a reuse step reads 4096 numbers per gradient, not
    all of them); only a gradient whose head is all zero, or that is sparse or strided, is read whole."""
    flags = [False] * len(grads)
    heads, at = [], []
    for k, g in enumerate(grads):
        if g.layout == torch.strided and g.is_contiguous() and g.numel() > 0:
            heads.append(g.reshape(-1)[:head])
            at.append(k)
    if heads:
        peaks = torch.stack(torch._foreach_max(torch._foreach_abs(heads)))
        for k, hit in zip(at, (peaks != 0).tolist()):      # NaN != 0: a NaN gradient takes part (and is reported)
            flags[k] = hit
    return [f or bool(g.any()) for f, g in zip(flags, grads)]
