"""The sample dimension of a captured call, decided where the call is recorded.

A use's rows need its sample at dimension 0 of x and of dL/dy (curvature/uses.py moves it there at
the step, by the size-m rule over the op's leading dims). Three cases are settled at the call instead,
where the tensors still say where they come from; each returns a *canonical* view pair (x_c, y_c),
sample first, and the tensor the call hands on (``back``: a view of y_c, so the output gradient
reaches y_c's node, which the capture hooks):

* **broadcast over the batch** (``expand_batch``): an input and output whose leading dim has size 1
  while the batch has m > 1 (an ``nn.Embedding`` of ``arange(T)[None]``, GPT-2's and BERT's position
  ids): in the captured forward only, both are expanded to m along it; the caller's broadcast then
  meets an output that already has the batch, the values are the same, and each sample gets its own
  output gradient (their sum is what the parameter's gradient was). Integer ids with no batch dim at
  all (``wpe(torch.arange(T))``, x [T]) get a new dim 0 expanded to m (``prepend_batch``).
* **a tie broken by provenance** (``by_provenance``): several leading dims of size m, and x a
  permuted view of a tensor whose dim 0 has size m and is outermost in memory, in a model whose input is batch first
  (timm's LayerNorm2d: ``F.layer_norm(x.permute(0, 2, 3, 1))`` at batch 8 on an 8x8 map): the sample
  is the dim of x that is its base's dim 0 in memory (the one with the base's outermost stride).
* **rows flattened from the batch** (``unflatten``): x of shape [k m, ...], a contiguous view of
  all of a tensor whose dim 0 is m and is outermost in memory (each sample one block of k rows) (``x.view(-1, D)`` before
  ``torch.addmm`` in GPT-2's Conv1D): the rows are sample-major, x_c = x.view(m, k, ...).
"""
from __future__ import annotations

from torch import Tensor


def expand_batch(x: Tensor, y: Tensor, m: int | None) -> tuple[Tensor, Tensor] | None:
    """(x, y) expanded to m along their size-1 dim 0, or None when that is not the case."""
    if (m is None or m <= 1 or x.dim() == 0 or y.dim() == 0 or x.shape[0] != 1 or y.shape[0] != 1):
        return None
    return x.expand(m, *x.shape[1:]), y.expand(m, *y.shape[1:])


def prepend_batch(x: Tensor, y: Tensor, m: int | None) -> tuple[Tensor, Tensor] | None:
    """Ids with no batch dimension at all (nanoGPT's ``wpe(torch.arange(T))``: x [T], y [T, d]) and no
    dim of size m: (x, y) with a new dim 0 expanded to m (the caller's broadcast ``tok + pos`` meets an
    output that already has the batch; each sample gets its own output gradient), else None. Integer
    x only (an embedding's ids); when a dim of x has size m (T == m) the ids are taken as samples."""
    if (m is None or m <= 1 or x.dim() == 0 or x.is_floating_point() or x.is_complex()
            or any(s == m for s in x.shape) or tuple(y.shape[:x.dim()]) != tuple(x.shape)):
        return None
    return x.unsqueeze(0).expand(m, *x.shape), y.unsqueeze(0).expand(m, *y.shape)


def by_provenance(x: Tensor, dims: list[int], m: int) -> int | None:
    """Among ``dims`` (each of size m), the dim of x that is its base's dim 0 (module docstring)."""
    base = x._base
    if base is None or not _sample_blocks(base, m):
        return None
    outer = base.stride(0)
    hits = [d for d in dims if x.stride(d) == outer]
    return hits[0] if len(hits) == 1 else None


def unflatten(x: Tensor, m: int) -> int | None:
    """k when x's dim 0 holds k samples' rows sample-major (module docstring), else None."""
    base = x._base
    if (x.dim() == 0 or x.shape[0] % m or x.shape[0] == m or base is None or base.dim() < 2
            or not _sample_blocks(base, m) or not x.is_contiguous() or x.data_ptr() != base.data_ptr()
            or base.numel() != x.numel()):
        return None
    return x.shape[0] // m


def _sample_blocks(base: Tensor, m: int) -> bool:
    """``base`` has m samples along dim 0, each one block of memory: stride(0) * m is all of it
    (contiguous, or any layout whose dim 0 is outermost, e.g. attention's [B, H, T, d] laid out
    [B, T, H, d])."""
    return (base.dim() > 0 and base.shape[0] == m and base.stride(0) * m == base.numel()
            and all(base.stride(d) < base.stride(0) for d in range(1, base.dim()) if base.shape[d] > 1))
