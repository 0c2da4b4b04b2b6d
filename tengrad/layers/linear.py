"""``nn.Linear``: ``y[n,t,o] = sum_i x[n,t,i] W[o,i] + b[o]``; any extra leading dims form ``t``
(common), so the same spec covers 2-D inputs and sequences."""
from __future__ import annotations

from torch import nn

from tengrad_ir import LayerSpec

from .term import Term


def linear_terms(module: nn.Linear):
    terms = [Term("weight", LayerSpec.parse("n *t i, o i -> n *t o", name="Linear.weight"))]
    if module.bias is not None:
        terms.append(Term("bias", LayerSpec.parse("n *t, o -> n *t o", name="Linear.bias", source="ones")))
    return terms
