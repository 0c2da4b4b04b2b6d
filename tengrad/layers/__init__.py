"""Specs for torch.nn modules and the registry; ``register_layer`` adds a user's own layer."""
from torch import nn

from .channel_norm import batch_norm_terms, group_norm_terms, instance_norm_terms
from .conv import conv_terms
from .conv_transpose import conv_transpose_module_terms, conv_transpose_terms
from .embedding import embedding_terms
from .linear import linear_terms
from .norm import layer_norm_terms
from .rms_norm import rms_norm_terms
from .registry import factory_for, register_layer, registered_layers
from .term import Term

for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer(_cls, conv_terms)
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer(_cls, conv_transpose_module_terms)
register_layer(nn.Linear, linear_terms)
register_layer(nn.LayerNorm, layer_norm_terms)
register_layer(nn.Embedding, embedding_terms)
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_layer(_cls, batch_norm_terms)
for _cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    register_layer(_cls, instance_norm_terms)
register_layer(nn.GroupNorm, group_norm_terms)
register_layer(nn.RMSNorm, rms_norm_terms)

from .ops import register_op, registered_ops  # noqa: E402 (functional ops, beside the modules)

__all__ = ["Term", "register_layer", "registered_layers", "register_op", "registered_ops", "factory_for",
           "conv_transpose_terms"]
