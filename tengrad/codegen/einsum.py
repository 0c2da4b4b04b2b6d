"""Named-index einsum on torch tensors: ``contract(out, (t1, idx1), (t2, idx2), ...)``.

Two operands run through ``pair`` (below), one through a sum; more (or an index repeated within an
operand: a diagonal) go to opt_einsum, which picks the pairwise path.

``pair`` is torch.einsum's pairwise product written for the shapes the plans produce, where torch.einsum
on a CPU is slow by up to 16x (measured, ViT-tiny's reuse step, torch 2.13): it classifies each index
of ``a[ia] * b[ib] -> out`` as

    batch  B: in a, b and out          contracted C: in a and b, not out
    kept   A: only in a, in out        kept Bk: only in b, in out
    summed  : in one operand only, not in out (summed away first)

and then runs one of

    no C, no A, no Bk  ->  elementwise product                      (broadcast)
    C, no A, no Bk     ->  (a * b) summed over C per batch entry     (a dot per entry: no [B, 1, C] x [B, C, 1] bmm)
    otherwise          ->  mm / bmm of [B, A, C] x [B, C, Bk], each operand viewed in whichever of
                           [., A, C] or [., C, A]^T its memory already has (no transposing copy);
                           with an ``Add`` (beta c + the product) one addmm / baddbmm
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import opt_einsum
import torch


def equation(out: tuple[str, ...], *index_lists: tuple[str, ...]) -> str:
    names = list(dict.fromkeys([i for idx in index_lists for i in idx] + list(out)))
    if len(names) > 52:
        raise ValueError(f"einsum with {len(names)} indices exceeds the 52 letters available")
    table = {n: chr(ord("a") + k) if k < 26 else chr(ord("A") + k - 26) for k, n in enumerate(names)}
    return ",".join("".join(table[i] for i in idx) for idx in index_lists) + "->" + "".join(table[i] for i in out)


class Add(NamedTuple):
    """``result + beta * c``, c laid out like the result; written into ``out`` when given (a buffer the
    caller keeps: a fresh parameter-sized tensor costs its page faults every step)."""
    c: torch.Tensor
    beta: float
    out: torch.Tensor | None = None

    def reshaped(self, shape) -> "Add":
        return Add(self.c.reshape(shape), self.beta, None if self.out is None else self.out.view(shape))

    def after(self, res: torch.Tensor) -> torch.Tensor:
        """res + beta * c as one more pass (the product was not a single matrix product)."""
        if self.out is None:
            return torch.add(res, self.c.reshape(res.shape), alpha=self.beta)
        return torch.add(res, self.c.reshape(res.shape), alpha=self.beta, out=self.out.view(res.shape))


def contract(out: tuple[str, ...], *operands: tuple[torch.Tensor, tuple[str, ...]], optimize="auto",
             add: Add | None = None) -> torch.Tensor:
    """``out[...] = sum prod operands`` over named indices (opt_einsum picks the pairwise path);
    ``add`` (c laid out along ``out``): the result + beta * c (one addmm where the product is one
    matrix product, ``pair``)."""
    if len(operands) == 2 and _plain(operands, out):
        (a, ia), (b, ib) = operands
        return pair(a, ia, b, ib, out, add)
    if len(operands) == 1 and _plain(operands, out):
        (a, ia), = operands
        res = _to(*_sum_away(a, ia, out), out)
    else:
        eq = equation(out, *(idx for _, idx in operands))
        res = opt_einsum.contract(eq, *(t for t, _ in operands), optimize=optimize, backend="torch")
    return res if add is None else add.after(res)


def _plain(operands, out) -> bool:
    """No index repeated within one operand or the output (a diagonal: left to opt_einsum)."""
    return all(len(set(idx)) == len(idx) for _, idx in operands) and len(set(out)) == len(out)


def pair(a: torch.Tensor, ia: tuple[str, ...], b: torch.Tensor, ib: tuple[str, ...],
         out: tuple[str, ...], add: Add | None = None) -> torch.Tensor:
    """``out[...] = sum a[ia] b[ib]`` (every index of ``out`` in ``a`` or ``b``); see the module docstring.
    ``add``: + beta * c, c laid out along ``out`` (an addmm when the product is one mm)."""
    res = _pair(a, ia, b, ib, tuple(out), add)
    if add is None or res[1]:
        return res[0]
    return add.after(res[0])


def _pair(a, ia, b, ib, out, add) -> tuple[torch.Tensor, bool]:
    """(the product, whether ``add`` went into it)."""
    r = _roles(tuple(ia), tuple(ib), out)
    if r.gone_a:
        a = a.sum(r.gone_a)
    if r.gone_b:
        b = b.sum(r.gone_b)
    ia, ib = r.ia, r.ib
    if not r.summed:        # a broadcast product: both operands laid out along out
        return _along(a, ia, out) * _along(b, ib, out), False
    if not r.kept_a and not r.kept_b:      # a dot per batch entry
        order = r.batch + r.summed
        prod = _to(a, ia, order) * _to(b, ib, order)
        res = prod.reshape(*prod.shape[:len(r.batch)], -1).sum(-1)
        return _to(res, r.batch, out), False
    size = dict(zip(ia, a.shape)) | dict(zip(ib, b.shape))
    summed = _contracted_order(a, ia, r.summed)
    am = _matrix(a, ia, r.batch, r.kept_a, summed, size, left=True)
    bm = _matrix(b, ib, r.batch, r.kept_b, summed, size, left=False)
    if add is not None and not r.batch and out in (r.result, r.kept_b + r.kept_a):   # beta c + A B, one product
        if out != r.result:                     # out = (B^T A^T)'s layout
            am, bm = bm.T, am.T
        mat = add.reshaped((am.shape[0], bm.shape[1]))
        res = torch.addmm(mat.c, am, bm, beta=add.beta, out=mat.out)
        return res.reshape(add.c.shape), True
    if add is not None and r.batch and out == r.result:     # beta c + A B per batch entry, one baddbmm
        mat = add.reshaped((am.shape[0], am.shape[1], bm.shape[2]))
        res = torch.baddbmm(mat.c, am, bm, beta=add.beta, out=mat.out)
        return res.reshape(add.c.shape), True
    res = torch.matmul(am, bm).reshape([size[i] for i in r.result])
    return _to(res, r.result, out), False


class _Roles(NamedTuple):
    gone_a: tuple[int, ...]     # dims of a summed first (in neither b nor out)
    gone_b: tuple[int, ...]
    ia: tuple[str, ...]         # the indices left after those sums
    ib: tuple[str, ...]
    batch: tuple[str, ...]
    kept_a: tuple[str, ...]
    kept_b: tuple[str, ...]
    summed: tuple[str, ...]     # contracted, in a's order
    result: tuple[str, ...]     # the matmul's result: batch + kept_a + kept_b


@functools.lru_cache(maxsize=4096)
def _roles(ia: tuple[str, ...], ib: tuple[str, ...], out: tuple[str, ...]) -> _Roles:
    """Each index's role in ``a[ia] * b[ib] -> out`` (worked out once per equation)."""
    gone_a = tuple(d for d, i in enumerate(ia) if i not in out and i not in ib)
    gone_b = tuple(d for d, i in enumerate(ib) if i not in out and i not in ia)
    ia = tuple(i for d, i in enumerate(ia) if d not in gone_a)
    ib = tuple(i for d, i in enumerate(ib) if d not in gone_b)
    batch = tuple(i for i in out if i in ia and i in ib)
    kept_a = tuple(i for i in ia if i in out and i not in ib)
    kept_b = tuple(i for i in ib if i in out and i not in ia)
    summed = tuple(i for i in ia if i in ib and i not in out)
    return _Roles(gone_a, gone_b, ia, ib, batch, kept_a, kept_b, summed, batch + kept_a + kept_b)


def _sum_away(t: torch.Tensor, idx: tuple[str, ...], keep: tuple[str, ...]):
    """t summed over its indices not in ``keep``: (tensor, its remaining indices)."""
    gone = [d for d, i in enumerate(idx) if i not in keep]
    if not gone:
        return t, tuple(idx)
    return t.sum(gone), tuple(i for i in idx if i in keep)


def _to(t: torch.Tensor, idx, out) -> torch.Tensor:
    """t (indices ``idx``) permuted to ``out`` (a view)."""
    idx, out = tuple(idx), tuple(out)
    return t if idx == out else t.permute([idx.index(i) for i in out])


def _along(t: torch.Tensor, idx: tuple[str, ...], out: tuple[str, ...]) -> torch.Tensor:
    """t laid out along ``out``, with a size-1 dimension for every index of ``out`` it lacks."""
    have = [i for i in out if i in idx]
    t = _to(t, idx, have)
    return t.reshape([t.shape[have.index(i)] if i in have else 1 for i in out])


def _contracted_order(a: torch.Tensor, ia: tuple[str, ...], summed: tuple[str, ...]) -> tuple[str, ...]:
    """The contracted indices in ``a``'s memory order (outermost first), so ``a`` needs no copy."""
    if len(summed) < 2:
        return summed
    strides = dict(zip(ia, a.stride()))
    return tuple(sorted(summed, key=lambda i: -strides[i]))


def _matrix(t, idx, batch, kept, summed, size, left: bool) -> torch.Tensor:
    """t as [B?, kept, summed] (left) or [B?, summed, kept] (right), through whichever of the two
    layouts (the other one transposed) its memory already has; a copy only when neither fits."""
    nb, nk, ns = (math.prod(size[i] for i in g) for g in (batch, kept, summed))
    straight = batch + (kept + summed if left else summed + kept)
    flipped = batch + (summed + kept if left else kept + summed)
    shape = ([nb] if batch else []) + ([nk, ns] if left else [ns, nk])
    for order, flip in ((straight, False), (flipped, True)):
        v = _to(t, idx, order)
        if v.is_contiguous():
            if not flip:
                return v.reshape(shape)
            return v.reshape(shape[:-2] + shape[-2:][::-1]).transpose(-1, -2)
    return _to(t, idx, straight).reshape(shape)
