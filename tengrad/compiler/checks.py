"""Argument checks at the top of ``CompiledLayer.gram / jvp / vjp / jacobian`` (one call per method).

``check_call(layer, quantity, x, gy, order=None, p=None, u=None)`` refuses, naming the argument:

* types: ``x`` and ``gy`` tensors; ``p`` a list or tuple of tensors (jvp); ``u`` a tensor (vjp);
* ``order``: None or one of ``layer.orders(quantity)`` (the message lists them);
* dtypes: ``gy``, every ``p[k]`` and ``u`` floating point; ``x`` integer ids for a one-hot (Embedding)
  layer, floating point otherwise;
* devices: ``x``, ``gy``, ``p``, ``u`` and the layer's parameters on one device (a meta ``x`` with a
  CPU ``gy`` would otherwise return uninitialised numbers);
* one-hot ids: every id of ``x`` in ``[0, V)`` with V the parameter's one-hot size (num_embeddings);
  ids equal to ``padding_idx`` are ordinary ids here (the layer drops them internally after this check).
  The id range costs one pass over ``x``; it is done once per tensor version (the optimizer calls
  gram, jvp and vjp on one stored batch).

Shapes are checked by ``CompiledLayer`` itself (binding.py) once the types are right.
"""
from __future__ import annotations

import weakref
from typing import Sequence

import torch

from tengrad_ir import kind_of

from ..errors import ShapeError, TengradError


def _kind(v: object) -> str:
    return f"{type(v).__name__}" if not isinstance(v, torch.Tensor) else f"a {v.dtype} tensor"


def _one_hot_sizes(layer) -> list[tuple[str, int]]:
    """``[(parameter name, V)]`` for the layer's one-hot terms whose one-hot index is a whole axis."""
    out = []
    params = dict(layer.params)
    for t in layer.terms:
        spec = t.spec
        if not kind_of(spec).integer_ids:
            continue
        axes = [a[0] for a in spec.param_axes if len(a) == 1]
        if spec.one_hot in axes and len(axes) == len(spec.param_axes):
            out.append((t.param, int(params[t.param].shape[axes.index(spec.one_hot)])))
    return out


def _check_ids(layer, x: torch.Tensor) -> None:
    sizes = _one_hot_sizes(layer)
    if not sizes or x.device.type == "meta" or x.numel() == 0:
        return
    seen = getattr(layer, "_ids_checked", None)
    if seen is not None and seen[0]() is x and seen[1] == x._version:
        return
    for param, v in sizes:
        bad = (x < 0) | (x >= v)
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise ShapeError(f"{layer.name}: id {int(x[where])} at x{list(where)} is out of range for "
                             f"{param} with {v} rows (valid ids: 0..{v - 1})")
    layer._ids_checked = (weakref.ref(x), x._version)


def check_call(layer, quantity: str, x: object, gy: object, order: object = None,
               p: object = None, u: object = None) -> None:
    """Refuse bad arguments of ``layer.<quantity>(...)`` with a message naming them (module docstring)."""
    name = f"{layer.name}.{quantity}"
    for arg, v in (("x", x), ("gy", gy)):
        if not isinstance(v, torch.Tensor):
            raise ShapeError(f"{name}: {arg} must be a torch.Tensor, got {_kind(v)}")
    if order is not None:
        valid = layer.orders(quantity)
        if not isinstance(order, str) or order not in valid:
            raise TengradError(f"{name}: unknown order {order!r}; valid: {list(valid)} (or None: the plan's choice)")
    ids = layer.reads_ids
    if ids and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise ShapeError(f"{name}: x must hold integer ids for {layer.name}, got {x.dtype}")
    if not ids and not x.is_floating_point():
        raise ShapeError(f"{name}: x must be floating point, got {x.dtype}")
    if not gy.is_floating_point():
        raise ShapeError(f"{name}: gy must be floating point, got {gy.dtype}")
    tensors = [("x", x), ("gy", gy)]
    if quantity == "jvp":
        if isinstance(p, torch.Tensor) or not isinstance(p, Sequence):
            raise ShapeError(f"{name}: p must be a list of {len(layer.params)} tensors shaped like the "
                             f"parameters {[n for n, _ in layer.params]}, got {_kind(p)}")
        for k, t in enumerate(p):
            if not isinstance(t, torch.Tensor):
                raise ShapeError(f"{name}: p[{k}] must be a tensor, got {_kind(t)}")
            if not t.is_floating_point():
                raise ShapeError(f"{name}: p[{k}] must be floating point, got {t.dtype}")
            tensors.append((f"p[{k}]", t))
    if quantity == "vjp":
        if not isinstance(u, torch.Tensor):
            raise ShapeError(f"{name}: u must be a tensor of shape (m,), got {_kind(u)}")
        if not u.is_floating_point():
            raise ShapeError(f"{name}: u must be floating point, got {u.dtype}")
        tensors.append(("u", u))
    tensors += [(f"parameter {n}", q) for n, q in layer.params]
    devices = list(dict.fromkeys(t.device for _, t in tensors))
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in tensors)
        raise ShapeError(f"{name}: tensors on different devices ({where}); put them on one device")
    if ids:
        _check_ids(layer, x)
