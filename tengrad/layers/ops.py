"""Specs of functional ops: an op call is compiled through the module spec factory of the same
hyperparameters (one function of stride/padding/groups/eps/... serves module and op).

The builder of a registered op (``builder_for(func)``), called with the op's own arguments, returns
``(shell, {shell param name: the op's tensor})``: a module of the matching type built on the meta
device from the op's arguments (``F.linear(x, w, b)`` is
``nn.Linear(w.shape[1], w.shape[0], bias=b is not None)``, ``F.conv2d(x, w, b, stride, padding,
dilation, groups)`` the ``nn.Conv2d`` with those hyperparameters, ...), whose parameters are then
replaced by the op's weight/bias tensors (``with_params``: detached views, no copy), so
``tengrad.compile(shell)`` gives the op's plan through the module's own spec factory.
``register_op(func, builder)`` declares a user's op the same way:
``builder(*args, **kwargs) -> (module, {param name: tensor})`` (or None: not a use).
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

OpBuilder = Callable[..., "tuple[nn.Module, dict[str, Tensor]] | None"]
OPS: dict[Callable, tuple[inspect.Signature | None, OpBuilder]] = {}


def register_op(func: Callable, builder: OpBuilder) -> OpBuilder:
    """Declare the functional op ``func``: ``builder(*args, **kwargs)`` (the op's own arguments) returns
    ``(module, {param name: tensor read by the op})`` where ``module`` is a module of a type registered
    with ``tengrad.register_layer`` whose forward on the op's input gives the op's output."""
    if not callable(func) or not callable(builder):
        raise TypeError("register_op(func, builder): both must be callable")
    OPS[func] = (None, builder)
    return builder


def registered_ops() -> tuple[Callable, ...]:
    return tuple(OPS)


def builder_for(func: Callable) -> OpBuilder | None:
    entry = OPS.get(func)
    return None if entry is None else entry[1]


def with_params(module: nn.Module, tensors: dict[str, Tensor | None]) -> tuple[nn.Module, dict[str, Tensor]]:
    used = {}
    for name, t in tensors.items():
        if t is None:
            setattr(module, name, None)
            continue
        setattr(module, name, nn.Parameter(t.detach(), requires_grad=True))
        used[name] = t
    return module, used


def _linear(input, weight, bias=None):
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    return with_params(m, {"weight": weight, "bias": bias})


def _conv(cls):
    def build(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        m = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                padding=padding, dilation=dilation, groups=groups, bias=bias is not None, device="meta")
        return with_params(m, {"weight": weight, "bias": bias})
    return build


def _conv_transpose(cls):
    def build(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
        m = cls(weight.shape[0], weight.shape[1] * groups, tuple(weight.shape[2:]), stride=stride,
                padding=padding, output_padding=output_padding, groups=groups, bias=bias is not None,
                dilation=dilation, device="meta")
        return with_params(m, {"weight": weight, "bias": bias})
    return build


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    if weight is None and bias is None:
        return None
    m = nn.LayerNorm(normalized_shape, eps=eps, elementwise_affine=True, bias=True, device="meta")
    return with_params(m, {"weight": weight, "bias": bias})


def _rms_norm(input, normalized_shape, weight=None, eps=None):
    if weight is None:
        return None
    m = nn.RMSNorm(normalized_shape, eps=eps, elementwise_affine=True, device="meta")
    return with_params(m, {"weight": weight})


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    if weight is None and bias is None:
        return None
    m = nn.GroupNorm(num_groups, input.shape[1], eps=eps, affine=True, device="meta")
    return with_params(m, {"weight": weight, "bias": bias})


def _stats_norm(classes):
    """The builder of ``F.batch_norm`` / ``F.instance_norm``: the module of the input's spatial rank
    (``classes[k]`` for k = 0..3 spatial dims: BatchNorm1d takes [N, C] and [N, C, L]; instance norm has
    no k = 0, its input is [N, C, L] at least)."""
    def build(input, running_mean=None, running_var=None, weight=None, bias=None, training=False,
              momentum=0.1, eps=1e-5, *rest, **kw):
        if weight is None and bias is None:
            return None
        spatial = input.dim() - 2
        cls = classes[spatial] if 0 <= spatial <= 3 else None
        if cls is None:
            return None
        m = cls(input.shape[1], eps=eps, affine=True, track_running_stats=False, device="meta")
        m.running_mean, m.running_var = running_mean, running_var
        m.train(bool(training))
        return with_params(m, {"weight": weight, "bias": bias})
    return build


def _embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
               sparse=False):
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    m = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=padding_idx, max_norm=max_norm,
                     device="meta")
    return with_params(m, {"weight": weight})


for _f, _b in ((F.linear, _linear), (F.conv1d, _conv(nn.Conv1d)), (F.conv2d, _conv(nn.Conv2d)),
               (F.conv3d, _conv(nn.Conv3d)), (F.conv_transpose1d, _conv_transpose(nn.ConvTranspose1d)),
               (F.conv_transpose2d, _conv_transpose(nn.ConvTranspose2d)),
               (F.conv_transpose3d, _conv_transpose(nn.ConvTranspose3d)), (F.layer_norm, _layer_norm), (F.rms_norm, _rms_norm),
               (F.group_norm, _group_norm), (F.batch_norm, _stats_norm((nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))),
               (F.instance_norm, _stats_norm((None, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d))), (F.embedding, _embedding)):
    register_op(_f, _b)

#: ops whose output has the batch as dimension 0 only (the rest may be "*t" leading dims)
BATCH_FIRST_ONLY = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                    F.group_norm, F.batch_norm, F.instance_norm}


_LINEAR, _NORMS, _EMBEDDING = F.linear, (F.layer_norm, F.rms_norm), F.embedding   # the originals


def leading_dims(func: Callable, x: Tensor, args: tuple, kwargs: dict) -> int:
    """How many leading dims of the op input may hold the sample (the rest are features)."""
    if func in BATCH_FIRST_ONLY:
        return 1
    if func is _LINEAR:
        return x.dim() - 1
    if func in _NORMS:
        ns = args[1] if len(args) > 1 else kwargs["normalized_shape"]
        return x.dim() - (1 if isinstance(ns, int) else len(ns))
    if func is _EMBEDDING:
        return x.dim()
    return 1


def module_leading_dims(module: nn.Module, x: Tensor) -> int:
    """The same for a module-level capture."""
    if isinstance(module, nn.Linear):
        return x.dim() - 1
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return x.dim() - len(module.normalized_shape)
    if isinstance(module, nn.Embedding):
        return x.dim()
    return 1
