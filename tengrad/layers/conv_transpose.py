"""``nn.ConvTranspose1d/2d/3d``: ``y[n,(g co),o..] = sum over (ci, k) with o = s*i + d*k - p of
X[n,(g ci),i..] W[(g ci),co,k..]`` (+ b[(g co)]), torch's weight layout ``[in, out/groups, k...]``.

The index maps sit on the *output* (``o = s*i + d*k - p``): the output gradient is read through them,
``J[n, g, ci, co, k] = sum_i X[n, g, ci, i] G[n, g, co, s*i + d*k - p]`` (zero outside ``[0, N_o)``),
with i common and k free (it sits with the parameter). ``output_padding`` (and a forward's
``output_size``) only extend the output: N_o is read from the output gradient's shape, so the maps
do not depend on it.

``conv_transpose_terms`` is a pure function of the hyperparameters (usable by op-level capture of
``F.conv_transpose1d/2d/3d``); ``conv_transpose_module_terms`` is the module factory.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from tengrad_ir import LayerSpec

from ..errors import TengradError
from .term import Term

_NAMES = {1: "ConvTranspose1d", 2: "ConvTranspose2d", 3: "ConvTranspose3d"}


def _tuple(v, dims: int, what: str, name: str) -> tuple[int, ...]:
    t = tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims
    if len(t) != dims or not all(isinstance(a, int) and not isinstance(a, bool) for a in t):
        raise TengradError(f"{name}: {what} must be an int or {dims} ints, got {v!r}")
    return t


def conv_transpose_terms(dims: int, stride, padding, output_padding, dilation, groups: int, has_bias: bool,
                         in_channels: int | None = None, out_channels: int | None = None,
                         name: str | None = None) -> list[Term]:
    """The terms of a ``dims``-d transposed convolution (weight, and bias when ``has_bias``).

    ``stride``, ``padding``, ``output_padding``, ``dilation``: ints or ``dims``-tuples as torch takes
    them; ``in_channels``/``out_channels`` (optional) are checked against ``groups``.
    """
    name = name or _NAMES.get(dims, f"ConvTranspose{dims}d")
    if dims not in (1, 2, 3):
        raise TengradError(f"{name}: a transposed convolution has 1 to 3 spatial dims, got {dims}")
    s, p = _tuple(stride, dims, "stride", name), _tuple(padding, dims, "padding", name)
    d, op = _tuple(dilation, dims, "dilation", name), _tuple(output_padding, dims, "output_padding", name)
    if min(s + d) < 1 or min(p + op) < 0:
        raise TengradError(f"{name}: stride and dilation must be >= 1, padding and output_padding >= 0 "
                           f"(got stride={s}, dilation={d}, padding={p}, output_padding={op})")
    if not isinstance(groups, int) or groups < 1:
        raise TengradError(f"{name}: groups must be a positive int, got {groups!r}")
    for ch, what in ((in_channels, "in_channels"), (out_channels, "out_channels")):
        if ch is not None and ch % groups:
            raise TengradError(f"{name}: {what}={ch} is not divisible by groups={groups}")
    ins = " ".join(f"i{j}" for j in range(dims))
    outs = " ".join(f"o{j}" for j in range(dims))
    ks = " ".join(f"k{j}" for j in range(dims))
    maps = {f"o{j}": f"{s[j]}*i{j} + {d[j]}*k{j} - {p[j]}" for j in range(dims)}
    weight = LayerSpec.parse(f"n (g ci) {ins}, (g ci) co {ks} -> n (g co) {outs}", name=f"{name}.weight",
                             maps=maps, sizes={"g": groups})
    terms = [Term("weight", weight)]
    if has_bias:
        terms.append(Term("bias", LayerSpec.parse(f"n {outs}, c -> n c {outs}", name=f"{name}.bias",
                                                  source="ones")))
    return terms


def conv_transpose_module_terms(module: nn.modules.conv._ConvTransposeNd) -> Sequence[Term]:
    """The spec factory registered for ``nn.ConvTranspose1d/2d/3d``."""
    if module.padding_mode != "zeros":  # torch itself only supports zeros for transposed convs
        raise TengradError(f"{type(module).__name__}: padding_mode {module.padding_mode!r} is not supported")
    return conv_transpose_terms(len(module.kernel_size), module.stride, module.padding, module.output_padding,
                                module.dilation, module.groups, module.bias is not None,
                                module.in_channels, module.out_channels, name=type(module).__name__)
