"""``nn.Embedding``: ``y[n,t,d] = sum_v onehot(ids)[n,t,v] W[v,d]``; the one-hot input is never
materialised (gathers and scatters instead), and ids equal to ``padding_idx`` contribute nothing,
as in torch's own backward."""
from __future__ import annotations

from torch import nn

from tengrad_ir import LayerSpec

from ..errors import UnsupportedLayerError
from .term import Term


def embedding_terms(module: nn.Embedding):
    if module.max_norm is not None:
        raise UnsupportedLayerError("Embedding with max_norm renormalises its weight inside forward; "
                                    "its output is not linear in the weight, so tengrad refuses it")
    pad = module.padding_idx
    pre_map = None
    if pad is not None:
        pre_map = lambda ids: ids.masked_fill(ids == pad, -1)  # noqa: E731
    spec = LayerSpec.parse("n *t v, v d -> n *t d", name="Embedding.weight", source="one_hot", one_hot="v",
                           pre_map=f"drop padding_idx={pad}" if pad is not None else None)
    return [Term("weight", spec, pre_map)]
