"""torch.distributed plumbing for the distributed TENGraD step: status, padded gathers, byte counts.

* ``Failure``: the first error a rank meets inside a step. A rank that fails keeps issuing every
  collective of the step (with zeros), so no rank waits forever; the error travels in a status
  element of the next collective and every rank raises the same ``TENGraDError`` (``raise_if_any``).
* ``pad0`` / ``unpad_cat``: gloo's gather/all_gather need equal sizes on every rank, so dimension 0 is
  padded to the largest rank's size; every rank already knows every rank's size (the step's first
  collective all-gathers them), so no size is sent with the data.
* ``Traffic``: bytes this rank hands to collectives, by layer and by kind, for ``explain()`` and
  ``benchmarks/distributed.py``. Counted as the payload this rank contributes (a gather/all-gather:
  its own padded tensor; an all-reduce: the buffer; a broadcast: the buffer on the source), the
  quantity a ring or tree moves per rank up to a factor below 2.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor

from tengrad.optim.errors import TENGraDError

#: errors that mean a bug in tengrad, never a property of the data: re-raised as they are
PROGRAMMING_ERRORS = (AttributeError, NameError, ImportError, AssertionError)


class Failure:
    """The first error of this rank in the current step (None while all is well)."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def record(self, err: BaseException) -> None:
        if self.error is None:
            self.error = err

    @property
    def flag(self) -> float:
        return 0.0 if self.error is None else 1.0

    def message(self) -> str:
        e = self.error
        if e is None:
            return ""
        return str(e) if isinstance(e, TENGraDError) else f"{type(e).__name__}: {e}"


def raise_if_any(failed_somewhere: bool, failure: Failure, group, step: int) -> None:
    """Every rank calls this with the same ``failed_somewhere``; on failure all raise the same error.

    The messages are all-gathered (only on failure: the one collective of the error path) and the
    lowest failing rank's message is raised on every rank, naming that rank and the step.
    """
    if not failed_somewhere:
        return
    messages: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, (failure.error is not None, failure.message()), group=group)
    rank, text = next((r, t) for r, (bad, t) in enumerate(messages) if bad)
    if isinstance(failure.error, PROGRAMMING_ERRORS):
        raise failure.error      # a bug keeps its type on the rank that met it
    raise TENGraDError(f"rank {rank} at step {step}: {text} (raised on every rank; nothing was updated)")


def pad0(t: Tensor, size: int) -> Tensor:
    """``t`` padded with zeros along dimension 0 to ``size`` rows."""
    if t.shape[0] == size:
        return t.contiguous()
    out = t.new_zeros((size, *t.shape[1:]))
    out[:t.shape[0]] = t
    return out


def unpad_cat(parts: list[Tensor], sizes: list[int]) -> Tensor:
    """Concatenate the first ``sizes[r]`` rows of each gathered part (rank order)."""
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


class Traffic:
    """Bytes this rank contributes to collectives: ``by_layer[layer][kind]`` and ``total``."""

    def __init__(self) -> None:
        self.by_layer: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.total = 0

    def add(self, layer: str, kind: str, t: Tensor) -> None:
        n = t.numel() * t.element_size()
        self.by_layer[layer][kind] += n
        self.total += n

    def reset(self) -> None:
        self.by_layer.clear()
        self.total = 0


def world(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group, r: int) -> int:
    """The global rank of rank ``r`` of ``group`` (``dst``/``src`` of gather/broadcast are global)."""
    return r if group is None else dist.get_global_rank(group, r)
