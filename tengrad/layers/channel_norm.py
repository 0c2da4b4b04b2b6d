"""Norms with a per-channel affine: ``y[n,c,s..] = x_hat[n,c,s..] w[c] + b[c]``.

``x_hat`` (the normalised input) is a pre-map of the layer input (paper, Remark 1); ``c`` is a
group index (input, parameter and output), the spatial dims ``*s`` are common (zero or more: a
BatchNorm1d on ``[N, C]`` has none). The bias term is ``ones[n,s..] b[c]`` (``c`` free).

* ``nn.BatchNorm1d/2d/3d``: in training mode ``x_hat`` uses the mean and the biased variance of the
  captured batch over ``(n, s..)``, held fixed (the K-FAC convention: the samples couple through the
  statistics, which J ignores, so row i is the gradient of ``<gy_i, w x_hat_i + b>`` with x_hat fixed);
  in eval mode, and whenever the module keeps running statistics and is not training, the running
  statistics. A module without running statistics (``track_running_stats=False``) always uses the
  batch statistics, as its forward does.
* ``nn.InstanceNorm1d/2d/3d`` (``affine=True``): per-sample, per-channel statistics over ``s..``;
  with ``track_running_stats=True`` in eval mode, the running statistics.
* ``nn.GroupNorm``: statistics per sample and channel group; no running statistics.

Which statistics: the module's own ``training`` flag *when the curvature is computed* (in
``opt.step()`` right after the backward of the captured forward), i.e. what the module did in that
forward; the optimizer captures every forward of a model in training mode, including a BatchNorm
kept in eval mode for fine-tuning, whose x_hat then uses the running statistics. Running statistics
are read at that time too; an eval-mode module does not change them. The batch statistics are those
of the stored input itself, so a curvature batch kept for ``update_freq`` steps keeps its x_hat.
``affine=False`` gives no parameters, hence no block.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tengrad_ir import LayerSpec

from .term import Term


def channel_affine_terms(module: nn.Module, x_hat: Callable[[torch.Tensor], torch.Tensor],
                         label: str) -> list[Term]:
    """The weight and bias terms of ``y = x_hat w[c] + b[c]`` (``label`` names the pre-map)."""
    cls = type(module).__name__
    terms = []
    if getattr(module, "weight", None) is not None:
        terms.append(Term("weight", LayerSpec.parse("n c *s, c -> n c *s", name=f"{cls}.weight",
                                                    pre_map=label), x_hat, pre_map_keeps_shape=True))
    if getattr(module, "bias", None) is not None:
        terms.append(Term("bias", LayerSpec.parse("n *s, c -> n c *s", name=f"{cls}.bias", source="ones")))
    return terms


def _running(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return module.running_mean.to(x.device, x.dtype), module.running_var.to(x.device, x.dtype)


def uses_batch_statistics(module: nn.modules.batchnorm._NormBase) -> bool:
    """What ``module.forward`` does now: batch (True) or running (False) statistics."""
    return module.training or module.running_mean is None or module.running_var is None


def batch_norm_terms(module: nn.modules.batchnorm._BatchNorm) -> list[Term]:
    if not module.affine:
        return []
    eps = module.eps

    def x_hat(x: torch.Tensor) -> torch.Tensor:
        if uses_batch_statistics(module):
            return F.batch_norm(x, None, None, None, None, True, 0.0, eps)
        mean, var = _running(module, x)
        return F.batch_norm(x, mean, var, None, None, False, 0.0, eps)

    return channel_affine_terms(module, x_hat, "batch_norm (batch statistics in training mode, "
                                               "running statistics in eval mode; no affine)")


def instance_norm_terms(module: nn.modules.instancenorm._InstanceNorm) -> list[Term]:
    if not module.affine:
        return []
    eps = module.eps

    def x_hat(x: torch.Tensor) -> torch.Tensor:
        if uses_batch_statistics(module):
            return F.instance_norm(x, None, None, None, None, True, 0.0, eps)
        mean, var = _running(module, x)
        return F.instance_norm(x, mean, var, None, None, False, 0.0, eps)

    return channel_affine_terms(module, x_hat, "instance_norm (per-sample statistics, running "
                                               "statistics in eval mode when tracked; no affine)")


def group_norm_terms(module: nn.GroupNorm) -> list[Term]:
    if not module.affine:
        return []
    groups, eps = module.num_groups, module.eps
    x_hat = lambda x: F.group_norm(x, groups, None, None, eps)  # noqa: E731
    return channel_affine_terms(module, x_hat, f"group_norm ({groups} groups, no affine)")
