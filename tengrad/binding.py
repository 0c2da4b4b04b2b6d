"""Binding a spec's axes to tensor shapes: index sizes, and tensors with one dimension per index.

``bind_sizes`` solves ``prod(sizes of an axis's indices) == that dimension`` over the operands
(a grouped axis ``(g ci)`` needs all but one of its sizes known from elsewhere, e.g. ``g`` from the
spec's fixed sizes). ``to_indexed`` reshapes a tensor so that it has one dimension per index (a
variadic axis ``*t`` flattens its dims into one, of size 1 when there are none).
"""
from __future__ import annotations

import math

import torch

from tengrad_ir import LayerSpec
from tengrad_ir.notation import Axes, format_axes

from .errors import ShapeError


def axis_dims(axes: Axes, shape: tuple[int, ...], what: str) -> list[tuple[tuple[str, ...], int]]:
    """Pair each axis with its dimension size; a variadic axis takes what the others leave."""
    variadic = [k for k, a in enumerate(axes) if a[0].startswith("*")]
    fixed = len(axes) - len(variadic)
    if (variadic and len(shape) < fixed) or (not variadic and len(shape) != fixed):
        raise ShapeError(f"{what} has shape {tuple(shape)}, expected {format_axes(axes)!r} "
                         f"({'at least ' if variadic else ''}{fixed} dims)")
    out, pos = [], 0
    for axis in axes:
        if axis[0].startswith("*"):
            take = len(shape) - fixed
            out.append(((axis[0][1:],), math.prod(shape[pos:pos + take])))
            pos += take
        else:
            out.append((axis, shape[pos]))
            pos += 1
    return out


def bind_sizes(spec: LayerSpec, operands: list[tuple[Axes, tuple[int, ...], str]]) -> dict[str, int]:
    """Index sizes from ``(axes, shape, what)`` triples and the spec's fixed sizes."""
    sizes = dict(spec.sizes)
    constraints = [(axis, dim, what) for axes, shape, what in operands for axis, dim in axis_dims(axes, shape, what)]
    changed = True
    while changed:
        changed = False
        for axis, dim, what in constraints:
            names = [n.lstrip("*") for n in axis]
            unknown = [n for n in names if n not in sizes]
            known = math.prod(sizes[n] for n in names if n in sizes)
            if len(unknown) == 1:
                if known == 0 or dim % known:
                    raise ShapeError(f"{what}: dimension {dim} of axis {format_axes((axis,))!r} is not "
                                     f"divisible by {known}")
                sizes[unknown[0]] = dim // known
                changed = True
            elif not unknown and known != dim:
                detail = ", ".join(f"{n}={sizes[n]}" for n in names)
                raise ShapeError(f"{what}: axis {format_axes((axis,))!r} has size {dim}, expected {known} ({detail})")
    missing = [i for i in spec.roles if i not in sizes]
    if missing:
        raise ShapeError(f"{spec.name}: cannot infer the size of index {missing[0]!r} from the shapes")
    return sizes


def to_indexed(t: torch.Tensor, axes: Axes, sizes: dict[str, int], what: str) -> torch.Tensor:
    """``t`` reshaped to one dimension per index of ``axes`` (in order)."""
    dims = axis_dims(axes, tuple(t.shape), what)
    return t.reshape([sizes[n.lstrip("*")] for axis, _ in dims for n in axis])
