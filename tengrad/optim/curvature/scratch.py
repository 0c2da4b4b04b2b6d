"""Direction buffers kept across steps for the large parameters.

A step's direction d = g / a + R^T u' of a parameter is written into a fresh tensor unless it has
somewhere to go. A fresh parameter-sized tensor above glibc's mmap threshold (at most 32 MiB) is mapped
and zero-faulted page by page on every step: measured on the 4096 x 4096 Linear (64 MiB), the addmm
that forms d took 96 ms into a fresh tensor and 48 ms into a kept one (1 thread, AMD EPYC). So every
parameter of at least ``MIN_NUMEL`` elements gets one buffer, kept by the estimator and reused each
step; d lives in it from the moment it is formed until the momentum update has read it
(update.apply copies it, ``is_kept``, on the step that creates a momentum buffer: a kept buffer is
never adopted as one).

Memory: the buffers are what the step's peak held anyway (the directions), now held between steps
too: sum of the large parameters' sizes in the compute dtype. Most large blocks no longer need one:
their d is never formed (update.Deferred, estimator/local.py ``_deferrable``: nu d goes straight into the
momentum buffer); a buffer is made only for a large block with a prior, a parameter without a gradient or
one not in the compute dtype.
"""
from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch import Tensor

#: parameters of at least this many elements (4 MiB in float32) get a kept direction buffer
MIN_NUMEL = 1 << 20

#: every live kept buffer by the data pointer of its storage (a direction is a view of one: the same storage)
_KEPT: "weakref.WeakValueDictionary[int, Tensor]" = weakref.WeakValueDictionary()


def keep(buf: Tensor) -> Tensor:
    """Register ``buf`` as a buffer kept across steps whose views are handed out as directions (``is_kept``):
    the step that makes a momentum buffer of such a view copies it (update.apply)."""
    _KEPT[buf.untyped_storage().data_ptr()] = buf
    return buf


def is_kept(t: Tensor) -> bool:
    """Whether ``t`` lives in a kept direction buffer, or any view of one (it must be copied before
    anything keeps it)."""
    return t.numel() > 0 and _KEPT.get(t.untyped_storage().data_ptr()) is not None


class Scratch:
    """One buffer per large parameter (by id, with a weak reference to tell a new parameter at a
    recycled id from the old one)."""

    def __init__(self, min_numel: int | None = None) -> None:
        self.min_numel = MIN_NUMEL if min_numel is None else min_numel
        self._buffers: dict[int, tuple[weakref.ref, Tensor]] = {}

    def buffers(self, params: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor | None] | None:
        """A buffer shaped and typed like ``like[i]`` for each large ``params[i]`` (None for the others;
        None for the whole block when none is large)."""
        if not any(p.numel() >= self.min_numel for p in params):
            return None
        out: list[Tensor | None] = []
        for p, t in zip(params, like):
            if p.numel() < self.min_numel:
                out.append(None)
                continue
            ref, buf = self._buffers.get(id(p), (None, None))
            if (buf is None or ref() is not p or buf.shape != t.shape or buf.dtype != t.dtype
                    or buf.device != t.device):
                buf = keep(torch.empty_like(t, memory_format=torch.contiguous_format))
                self._buffers[id(p)] = (weakref.ref(p), buf)
            out.append(buf)
        return out

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for _, b in self._buffers.values())

    def tensors(self) -> list[Tensor]:
        return [b for _, b in self._buffers.values()]
