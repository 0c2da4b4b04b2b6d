"""Capture of ops linear in a parameter that are no registered layer: matmuls, ``torch.einsum``,
elementwise ``x * w``, ``x + b``, ``w.expand(...)`` (tengrad/layers/linear_ops.py says which).

For a call seen by the op-level mode (capture/ops.py) that reads a trainable parameter or a view of
one, ``linear_ops.analyze`` writes it as ``y[out] = sum U[u] W[w]`` (+ a bias). Here:

1. the sample letter: the letter of U and y, not of any W, whose dim of y has size m (the batch of
   the model input). None of size m: rows flattened from the batch (``sample.unflatten``) or a
   size-1 dim broadcast over the batch (``sample.expand_batch``); several: the view's provenance
   (``sample.by_provenance``); still open: not a use (the parameter keeps the damped identity, or
   its block's consistency check names it).
2. U and y are viewed sample first (the view of y is what the gradient hook sits on, and the call
   returns a view of it: the model's forward sees the same values), and the letters become a
   ``LayerSpec``: the sample ``n`` first, ``"n a0 a1, a1 a2 -> n a0 a2"``.
3. the plan is ``tengrad.compile`` of a ``SpecShell`` with those specs (cached per specs, shapes and
   dtype); the use's parts place each operand's Jacobian in its parameter: the whole parameter
   (None) or the flat positions of the view (a LongTensor shaped like the operand; curvature/uses.py
   scatters with them), so a slice, an ``expand`` or a ``[:, :T]`` of a parameter is exact.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from tengrad.compiler.compiled import CompiledLayer
from tengrad.errors import TengradError
from tengrad.layers.linear_ops import ANALYSERS, LinearCall, analyze
from tengrad.layers.spec_shell import SpecShell
from tengrad.optim.capture import sample
from tengrad_ir import LayerSpec

#: the ops this capture looks at (a dict: one lookup per op call in a captured forward)
LINEAR_OPS = ANALYSERS


def positions(t: Tensor, p: Tensor, shape: tuple[int, ...]) -> Tensor | None:
    """Flat positions in ``p`` of the elements of its view ``t``, shaped ``shape`` (``t`` read as
    ``t.reshape(shape)``); None when ``t`` is ``p`` itself (the whole parameter, in order)."""
    if t is p:
        return None
    if not p.is_contiguous() or t.untyped_storage().data_ptr() != p.untyped_storage().data_ptr():
        raise TengradError(f"a tensor read by an op shares no storage with its parameter {tuple(p.shape)}")
    flat = torch.arange(p.numel(), device=p.device)
    return flat.as_strided(t.shape, t.stride(), t.storage_offset() - p.storage_offset()).reshape(shape)


class LinearUses:
    """Records linear-op uses for an op capture ``cap`` (its public ``owner``, ``record``, ``m``,
    ``batch_first``)."""

    def __init__(self, cap) -> None:
        self.cap = cap
        self._plans: dict = {}

    def call(self, func: Callable, args: tuple, kwargs: dict):
        cap = self.cap
        out = func(*args, **kwargs)
        if cap.m is None or not isinstance(out, Tensor) or not out.requires_grad:
            return out
        owners: dict[int, tuple[str, Tensor]] = {}

        def is_param(t) -> bool:
            hit = cap.owner(t)
            if hit is not None:
                owners[id(t)] = hit
            return hit is not None

        if not any(is_param(a) for a in _tensors(args, kwargs)):
            return out
        found = analyze(func, is_param, out, args, kwargs)
        if found is None:
            return out
        return self._record(func, found, out, owners)

    def _record(self, func, c: LinearCall, out: Tensor, owners) -> Tensor:
        m = self.cap.m
        wl = set("".join(o.letters for o in c.operands))
        free = [ch for ch in c.x_letters if ch in c.out_letters and ch not in wl]
        cands = [ch for ch in free if out.shape[c.out_letters.index(ch)] == m]
        x, y, xl, ol = c.x, out, c.x_letters, c.out_letters
        src, sl = c.source, c.source_letters
        if len(cands) > 1 and self.cap.batch_first and src is not None:
            d = sample.by_provenance(src, [sl.index(ch) for ch in cands if ch in sl], m)
            cands = [sl[d]] if d is not None else cands
        reshaped = False
        if not cands and free and ol[0] in free and xl[0] == ol[0]:
            k = sample.unflatten(src, m) if src is not None and sl[:1] == ol[0] else None
            pair = sample.expand_batch(x, y, m) if k is None else None
            if k is not None:
                x, y = x.reshape(m, k, *x.shape[1:]), y.view(m, k, *y.shape[1:])
                xl, ol = "\0" + xl, "\0" + ol      # the sample letter, then the rows' letter
                cands, reshaped = ["\0"], True
            elif pair is not None:                  # y expanded: the call hands on the batch (sample.py)
                (x, y), cands = pair, [ol[0]]
        if len(cands) != 1:
            return out
        s = cands[0]
        xp = [xl.index(s)] + [k for k, ch in enumerate(xl) if ch != s]
        op = [ol.index(s)] + [k for k, ch in enumerate(ol) if ch != s]
        xc = x.permute(xp) if xp != sorted(xp) else x
        if y is out and op == sorted(op):
            yc = back = out
        else:
            yc = y.permute(op)
            back = yc.permute([op.index(k) for k in range(len(op))])
            if reshaped:
                back = back.reshape(out.shape)
        names = {s: "n"}
        for ch in ol + xl + "".join(o.letters for o in c.operands):
            names.setdefault(ch, f"a{len(names) - 1}")
        out_axes = " ".join(names[ol[k]] for k in op)
        x_axes = " ".join(names[xl[k]] for k in xp)
        specs, shapes, parts = {}, {}, []
        for k, o in enumerate(c.operands):
            pname = "weight" if k == 0 else "bias"
            w_axes = " ".join(names[ch] for ch in o.letters)
            if o.source == "input":
                eq = f"{x_axes}, {w_axes} -> {out_axes}"
            else:
                ones = " ".join(names[ol[j]] for j in op if ol[j] not in o.letters)
                eq = f"{ones}, {w_axes} -> {out_axes}"
            try:
                specs[pname] = LayerSpec.parse(eq, name=f"{_fname(func)}.{pname}", source=o.source)
            except TengradError:
                return out
            shapes[pname] = tuple(o.shape)
            owner = owners.get(id(o.tensor)) or self.cap.owner(o.tensor)
            if owner is None:
                return out
            try:
                parts.append((owner[1], positions(o.tensor, owner[1], tuple(o.shape))))
            except TengradError:
                return out
        plan = self._plan(func, specs, shapes, xc)
        if plan is None:
            return out
        label = "+".join(dict.fromkeys(owners.get(id(o.tensor), self.cap.owner(o.tensor))[0] for o in c.operands))
        self.cap.record(yc, xc, plan, parts, f"{_fname(func)}({label})", 1)
        return back

    def _plan(self, func, specs: dict[str, LayerSpec], shapes, x: Tensor):
        key = (tuple((n, s, shapes[n]) for n, s in specs.items()), x.dtype, x.device)
        hit = self._plans.get(key)
        if hit is None:
            try:
                hit = CompiledLayer(SpecShell(specs, shapes, x.dtype, x.device), backend="torch")
            except TengradError:
                hit = False
            self._plans[key] = hit
        return hit or None


def _fname(func) -> str:
    return getattr(func, "__name__", str(func)).strip("_")


def _tensors(args: tuple, kwargs: dict):
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, Tensor))
