"""``nn.LayerNorm``: ``y[n,t,d] = x_hat[n,t,d] w[d] + b[d]`` with the normalisation ``x_hat`` a
pre-map of the input alone (paper, Remark 1); ``d`` is a group index (input, parameter and
output), one per normalised dimension."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from tengrad_ir import LayerSpec

from .term import Term


def layer_norm_terms(module: nn.LayerNorm):
    if not module.elementwise_affine:
        return []
    shape = tuple(module.normalized_shape)
    ds = " ".join(f"d{j}" for j in range(len(shape)))
    eps = module.eps
    x_hat = lambda x: F.layer_norm(x, shape, None, None, eps)  # noqa: E731
    terms = [Term("weight", LayerSpec.parse(f"n *t {ds}, {ds} -> n *t {ds}", name="LayerNorm.weight",
                                            pre_map="layer_norm (no affine)"), x_hat,
                  pre_map_keeps_shape=True)]
    if module.bias is not None:
        terms.append(Term("bias", LayerSpec.parse(f"n *t {ds}, {ds} -> n *t {ds}", name="LayerNorm.bias",
                                                  source="ones")))
    return terms
