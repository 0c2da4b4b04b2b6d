"""``nn.Conv1d/2d/3d``: ``y[n,(g co),o..] = sum X[n,(g ci), s*o + d*k - p] W[(g co),ci,k..] + b``.

Every stride, dilation, group count (depthwise and channel multipliers included) and padding
form ('same', 'valid', int, tuple) is an index map. A non-zero padding mode (reflect, replicate,
circular) becomes a pre-map that pads the input the way the module does, with zero offset maps.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from tengrad_ir import LayerSpec

from .term import Term


def _left_padding(module: nn.modules.conv._ConvNd) -> tuple[int, ...]:
    k, d = module.kernel_size, module.dilation
    if module.padding == "valid":
        return (0,) * len(k)
    if module.padding == "same":
        return tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
    return tuple(module.padding)


def conv_terms(module: nn.modules.conv._ConvNd):
    dims = len(module.kernel_size)
    cls = type(module).__name__
    ins = " ".join(f"i{j}" for j in range(dims))
    outs = " ".join(f"o{j}" for j in range(dims))
    ks = " ".join(f"k{j}" for j in range(dims))
    pre_map = None
    pads = _left_padding(module)
    if module.padding_mode != "zeros":
        mode, amounts = module.padding_mode, module._reversed_padding_repeated_twice
        pre_map = lambda x: F.pad(x, amounts, mode=mode)  # noqa: E731
        pads = (0,) * dims
    maps = {f"i{j}": f"{module.stride[j]}*o{j} + {module.dilation[j]}*k{j} - {pads[j]}" for j in range(dims)}
    weight = LayerSpec.parse(f"n (g ci) {ins}, (g co) ci {ks} -> n (g co) {outs}", name=f"{cls}.weight",
                             maps=maps, sizes={"g": module.groups},
                             pre_map=f"pad({module.padding_mode})" if pre_map else None)
    terms = [Term("weight", weight, pre_map)]
    if module.bias is not None:
        terms.append(Term("bias", LayerSpec.parse(f"n {outs}, o -> n o {outs}", name=f"{cls}.bias", source="ones")))
    return terms
