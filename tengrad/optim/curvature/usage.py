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
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def unused(params: Sequence[Tensor], record) -> str | None:
    """Why the block should be skipped, or None when it takes part in this step."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return "no gradient (its module took no part in this forward/backward)"
    captured = record is not None and (record.grad is not None or record.rows)
    if not captured and not any(_nonzero(g) for g in grads):
        return "zero gradient and no captured forward (its module took no part in this forward)"
    return None


def _nonzero(g: Tensor, head: int = 4096) -> bool:
    """Whether ``g`` has a non-zero entry: its first ``head`` entries first (a gradient that took part
    almost always has one there; a reuse step then reads 4096 numbers, not the whole gradient), then all."""
    flat = g.reshape(-1) if g.layout == torch.strided and g.is_contiguous() else None
    if flat is not None and flat.numel() > head and bool(flat[:head].any()):
        return True
    return bool(g.any())
