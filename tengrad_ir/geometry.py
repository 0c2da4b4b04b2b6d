"""Which specs are convolutions, and which admit the raw-covariance order (``factored_raw``)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

from .spec import LayerSpec


@dataclass(frozen=True)
class ConvGeometry:
    """A spec whose maps are convolutions: ``target = stride*out + dilation*kernel + offset``."""

    targets: tuple[str, ...]
    outs: tuple[str, ...]
    kernels: tuple[str, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    offset: tuple[int, ...]


@functools.lru_cache(maxsize=None)
def conv_geometry(spec: LayerSpec) -> ConvGeometry | None:
    """The convolution form of the spec's maps, or None when they are not one (1 to 3 spatial dims,
    each map ``s*o + d*k + c`` with o common and k independent, no common index outside the maps)."""
    if spec.source != "input" or not 1 <= len(spec.maps) <= 3:
        return None
    rows = []
    used: set[str] = set()
    for mp in spec.maps:
        common = [v for v in mp.variables if spec.roles[v] == "common"]
        indep = [v for v in mp.variables if spec.roles[v] == "independent"]
        if len(common) != 1 or len(indep) != 1 or len(mp.variables) != 2:
            return None
        o, k = common[0], indep[0]
        if {o, k} & used:
            return None
        used |= {o, k}
        rows.append((mp.target, o, k, mp.coeffs[o], mp.coeffs[k], mp.offset))
    if set(spec.indices("common")) != {r[1] for r in rows}:
        return None
    if any(i in spec.raw_input_indices for r in rows for i in (r[1], r[2])):
        return None
    return ConvGeometry(*[tuple(col) for col in zip(*rows)])


@dataclass(frozen=True)
class TransposedGeometry:
    """A spec whose output maps are transposed convolutions: ``out = stride*inp + dilation*kernel + offset``
    with ``inp`` a raw input index (common) and ``kernel`` a parameter index (free)."""

    targets: tuple[str, ...]
    ins: tuple[str, ...]
    kernels: tuple[str, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    offset: tuple[int, ...]


@functools.lru_cache(maxsize=None)
def transposed_geometry(spec: LayerSpec) -> TransposedGeometry | None:
    """The transposed-convolution form of the spec's output maps, or None (1 to 3 maps, each
    ``s*i + d*k + c`` with i common and k free, no common index outside the maps, no input maps)."""
    if spec.source != "input" or spec.maps or not 1 <= len(spec.out_maps) <= 3:
        return None
    rows = []
    used: set[str] = set()
    for mp in spec.out_maps:
        common = [v for v in mp.variables if spec.roles[v] == "common"]
        free = [v for v in mp.variables if spec.roles[v] == "free"]
        if len(common) != 1 or len(free) != 1 or len(mp.variables) != 2:
            return None
        i, k = common[0], free[0]
        if {i, k} & used:
            return None
        used |= {i, k}
        rows.append((mp.target, i, k, mp.coeffs[i], mp.coeffs[k], mp.offset))
    if set(spec.indices("common")) != {r[1] for r in rows}:
        return None
    return TransposedGeometry(*[tuple(col) for col in zip(*rows)])


def raw_factorable(spec: LayerSpec) -> bool:
    """Whether ``factored_raw`` applies: maps with an independent variable, disjoint from raw axes
    (output maps: with a free variable, the covariance of the raw output gradient unfolded)."""
    if spec.source != "input":
        return False
    if spec.out_maps:
        variables = {v for mp in spec.out_maps for v in mp.variables}
        return any(spec.roles[v] == "free" for v in variables) and not variables & set(spec.output_indices)
    if not spec.maps:
        return False
    variables = {v for mp in spec.maps for v in mp.variables}
    return (any(spec.roles[v] == "independent" for v in variables)
            and not variables & set(spec.raw_input_indices))
