"""``nn.RMSNorm``: ``y[n,t,d] = x_hat[n,t,d] w[d]`` with ``x_hat = x / sqrt(mean_d x^2 + eps)`` a
pre-map of the input alone (paper, Remark 1); ``d`` (one index per normalised dimension) is a group
index, like LayerNorm's. ``eps=None`` is ``torch.finfo(dtype).eps`` of the dtype the forward ran in,
taken as the weight's dtype (the pre-map itself runs on the input upcast to the compute dtype)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tengrad_ir import LayerSpec

from .term import Term


def rms_norm_terms(module: nn.RMSNorm) -> list[Term]:
    if not module.elementwise_affine:
        return []
    shape = tuple(module.normalized_shape)
    ds = " ".join(f"d{j}" for j in range(len(shape)))

    def x_hat(x: torch.Tensor) -> torch.Tensor:
        eps = module.eps if module.eps is not None else torch.finfo(module.weight.dtype).eps
        return F.rms_norm(x, shape, None, eps)

    label = f"rms_norm (eps={module.eps if module.eps is not None else 'finfo(dtype).eps'}, no affine)"
    return [Term("weight", LayerSpec.parse(f"n *t {ds}, {ds} -> n *t {ds}", name="RMSNorm.weight",
                                           pre_map=label), x_hat, pre_map_keeps_shape=True)]
