"""Index notation: ``"n (g ci) ih iw, (g co) ci kh kw -> n (g co) oh ow"``.

An *axis* is one dimension of a torch tensor; it carries one index, or several indices in
parentheses that are flattened row-major into that dimension (einops' convention: ``(g ci)`` is a
dimension of size ``N_g * N_ci`` whose slow part is ``g``). An axis ``*t`` is variadic: zero or more
tensor dimensions flattened into the index ``t`` (size 1 when there are none), e.g. the extra
leading dims of a Linear layer's input.
"""
from __future__ import annotations

import re

from .errors import SpecError

Axes = tuple[tuple[str, ...], ...]

_NAME = re.compile(r"\*?[A-Za-z_][A-Za-z0-9_]*$")


def parse_axes(text: str) -> Axes:
    """``"n (g ci) ih"`` -> ``(("n",), ("g", "ci"), ("ih",))``; a variadic axis keeps its ``*``."""
    if not isinstance(text, str):
        raise SpecError(f"axes must be a string like 'n (g ci) ih', got {type(text).__name__}")
    tokens = re.findall(r"\(|\)|[^\s()]+", text)
    axes: list[tuple[str, ...]] = []
    group: list[str] | None = None
    for tok in tokens:
        if tok == "(":
            if group is not None:
                raise SpecError(f"nested parentheses in axes {text!r}")
            group = []
        elif tok == ")":
            if group is None or not group:
                raise SpecError(f"unbalanced or empty parentheses in axes {text!r}")
            axes.append(tuple(group))
            group = None
        else:
            if not _NAME.match(tok):
                raise SpecError(f"{tok!r} in {text!r} is not an index name")
            if tok.startswith("*") and group is not None:
                raise SpecError(f"variadic index {tok!r} cannot sit inside parentheses in {text!r}")
            if group is None:
                axes.append((tok,))
            else:
                group.append(tok)
    if group is not None:
        raise SpecError(f"unbalanced parentheses in axes {text!r}")
    names = [name.lstrip("*") for axis in axes for name in axis]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SpecError(f"index {repeated[0]!r} appears twice in one operand {text!r}")
    return tuple(axes)


def parse_equation(text: str) -> tuple[list[Axes], Axes]:
    """``"a, b -> c"`` -> ``([axes(a), axes(b)], axes(c))``."""
    if not isinstance(text, str):
        raise SpecError(f"a layer equation must be a string like 'n i, o i -> n o', got {type(text).__name__}")
    if text.count("->") != 1:
        raise SpecError(f"a layer equation needs exactly one '->': {text!r}")
    lhs, rhs = text.split("->")
    return [parse_axes(part) for part in lhs.split(",")], parse_axes(rhs)


def indices_of(axes: Axes) -> tuple[str, ...]:
    """The index names of ``axes`` in order, without variadic markers."""
    return tuple(name.lstrip("*") for axis in axes for name in axis)


def variadic_of(axes: Axes) -> tuple[str, ...]:
    return tuple(axis[0][1:] for axis in axes if axis[0].startswith("*"))


def format_axes(axes: Axes) -> str:
    return " ".join(axis[0] if len(axis) == 1 else "(" + " ".join(axis) + ")" for axis in axes)
