"""The exact global-batch gradient over R ranks with uneven batches.

Rank r runs a mean-reduced loss over its m_r samples, so its ``param.grad`` is g_r = (1/m_r) sum_i dl_i.
The single-process gradient on the concatenated batch (M = sum_r m_r samples) is

    g = (1/M) sum_r sum_i dl_i = sum_r m_r g_r / M,

which is *not* DDP's equal average (1/R) sum_r g_r when the m_r differ (the last batch of an epoch).

Decision: g is reduced as sum_r (m_r g_r) / M in one all-reduce whose buffer carries m_r as an extra
element, so no separate reduction of the batch sizes is needed:

* a plain model: the optimizer all-reduces [m_r g_r (all trainable params, flat), m_r] in its step
  (``reduce_gradients``), asynchronously, overlapping the local curvature work;
* a ``DistributedDataParallel`` model: the optimizer registers a DDP communication hook
  (``weighted_mean_hook``) that does the same per gradient bucket, in DDP's own overlapped backward,
  replacing DDP's equal average; ``param.grad`` then already holds g and the step sends no gradient.

m_r is the batch of this rank's step: the sum, over the training-mode forwards with grad enabled since
the last step (outside torch.func transforms) whose output a backward reached, of dimension 0 of the
forward's first tensor argument (``BatchSize``, a forward hook; the batch is dimension 0, as everywhere
in TENGraD). Gradient accumulation over micro-batches (DDP's ``no_sync()`` for all but the last) sums
them: with (loss * m_j / M_r).backward() per micro-batch the accumulated g_r is the mean over the M_r
samples. A forward no backward reached (a reference or logging forward) does not count. On curvature
steps the captured layers' batch (the union of the micro-batches) is used instead (they must agree).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tengrad.optim.capture.hooks import OwnHook, transformed
from tengrad.optim.errors import TENGraDError


def _first_tensor(args, kwargs) -> Tensor | None:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, Tensor):
            return a
    return None


def _first_grad_tensor(output) -> Tensor | None:
    """The first tensor that requires grad in a model output (a tensor, or a tuple/list/dict of them)."""
    if isinstance(output, Tensor):
        return output if output.requires_grad else None
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for v in values:
        if isinstance(v, Tensor) and v.requires_grad:
            return v
    return None


class BatchSize:
    """Forward hook on the model: m_r, the summed batch of the forwards of this step that a backward
    reached (module docstring). ``next_step()`` starts a new sum with the next such forward."""

    def __init__(self, model: nn.Module) -> None:
        self.value: int | None = None
        self._fresh = True
        self._handle = model.register_forward_hook(OwnHook(self._hook), with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        if not (torch.is_grad_enabled() and module.training):
            return None
        t = _first_tensor(args, kwargs)
        if t is None or t.dim() == 0 or transformed(t):
            return None
        m, out = int(t.shape[0]), _first_grad_tensor(output)
        if out is None:
            self._count(m)
            return None
        counted = []

        def reached(grad):
            if not counted:             # once per forward, however many backwards run through it
                counted.append(True)
                self._count(m)

        out.register_hook(reached)
        return None

    def _count(self, m: int) -> None:
        if self._fresh:
            self.value, self._fresh = 0, False
        self.value += m

    def next_step(self) -> None:
        self._fresh = True

    def this_step(self) -> int | None:
        """The batch counted since the last step (None: no forward a backward reached yet)."""
        return None if self._fresh else self.value

    def get(self) -> int:
        if self.value is None:
            raise TENGraDError("distributed TENGraD: no forward with grad enabled since construction, "
                               "so this rank's batch size m_r is unknown")
        return self.value

    def remove(self) -> None:
        self._handle.remove()


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


class _HookState:
    def __init__(self, batch: BatchSize, group) -> None:
        self.batch = batch
        self.group = group


def weighted_mean_hook(state, bucket):   # no annotations: DDP checks them as real types
    """DDP comm hook: the bucket becomes sum_r m_r g_r / M (one all-reduce carrying m_r)."""
    buf = bucket.buffer()
    m = float(state.batch.value or 0)
    flat = torch.cat([buf * m, buf.new_tensor([m])])
    fut = dist.all_reduce(flat, group=state.group, async_op=True).get_future()

    def done(f):
        t = f.value()[0]
        return t[:-1] / t[-1]

    return fut.then(done)


def install_ddp_hook(model: nn.Module, batch: BatchSize, group) -> None:
    try:
        model.register_comm_hook(_HookState(batch, group), weighted_mean_hook)
    except (RuntimeError, ValueError) as err:
        raise TENGraDError("distributed TENGraD: cannot register its batch-size-weighted gradient hook "
                           f"on the DistributedDataParallel model ({err}); construct TENGraD before the "
                           "first backward and without another comm hook") from None


def dense_grad(p: Tensor) -> Tensor:
    """``p.grad`` detached and dense (Embedding(sparse=True)), zeros when None."""
    if p.grad is None:
        return torch.zeros_like(p)
    g = p.grad.detach()
    return g.to_dense() if g.is_sparse else g


def reduce_gradients(params: list[Tensor], m_r: int, dtype: torch.dtype, group):
    """Start the all-reduce of [m_r g_r..., m_r]; returns (work, flat buffer)."""
    parts = [dense_grad(p).reshape(-1).to(dtype) for p in params]
    flat = torch.cat(parts + [torch.ones(1, dtype=dtype, device=params[0].device)]) * float(m_r)
    return dist.all_reduce(flat, group=group, async_op=True), flat


def split_gradients(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    """The reduced buffer as per-parameter global gradients (divided by M, the last element)."""
    total = flat[-1]
    out, start = [], 0
    for p in params:
        out.append((flat[start:start + p.numel()] / total).reshape(p.shape))
        start += p.numel()
    return out
