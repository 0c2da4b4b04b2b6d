"""Hypothesis-generated Conv / ConvTranspose / Linear / LayerNorm / BatchNorm / GroupNorm / InstanceNorm / RMSNorm configurations against the oracle (float64).

Every order of gram / jvp / vjp (and order=None) plus the per-sample jacobian must agree with
the torch.func oracle to rel err <= 1e-10. Runs are derandomized and bounded (25 examples each).
"""
from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tengrad
from support.jacobian_oracle import batch_stat_view, compare_plan, per_sample_jacobian, trainable_params

TOL = 1e-10
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
INSTANCENORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def _check(module: nn.Module, x: torch.Tensor, seed: int, desc: str, view=None) -> None:
    module = module.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in module.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen, dtype=torch.float64))
        y = module(x)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    p = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for _, t in trainable_params(module)]
    u = torch.randn(x.shape[0], generator=gen, dtype=torch.float64)
    J = per_sample_jacobian(*(view(module, x) if view else (module, x)), gy)
    plan = tengrad.compile(module)
    failures = compare_plan(plan, module, x, gy, J, p, u, TOL)
    assert not failures, f"{desc} x{tuple(x.shape)}:\n  " + "\n  ".join(failures)


def _conv_shape(draw):
    """Dimension count, groups, channels (multiples of groups), kernel, stride and dilation of a
    (transposed) convolution."""
    d = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    ci = groups * draw(st.integers(1, 2))
    co = groups * draw(st.integers(1, 2))
    max_k = 3 if d < 3 else 2
    kernel = tuple(draw(st.integers(1, max_k)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(d))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(d))
    return d, groups, ci, co, kernel, stride, dilation


def _bias_batch_seed(draw):
    return draw(st.booleans()), draw(st.integers(2, 4)), draw(st.integers(0, 2**31 - 1))


@st.composite
def conv_configs(draw):
    d, groups, ci, co, kernel, stride, dilation = _conv_shape(draw)
    kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if kind == "same" and any(s != 1 for s in stride):
        kind = "tuple"  # torch: padding='same' requires stride 1
    if kind == "int":
        padding = draw(st.integers(0, 2))
        pads = (padding,) * d
    elif kind == "tuple":
        pads = tuple(draw(st.integers(0, 2)) for _ in range(d))
        padding = pads
    else:
        padding = kind
        pads = (0,) * d
    max_extra = 3 if d < 3 else 1
    spatial = []
    for k, dl, pd in zip(kernel, dilation, pads):
        eff = dl * (k - 1) + 1
        lo = 1 if kind == "same" else max(1, eff - 2 * pd)
        spatial.append(draw(st.integers(lo, lo + max_extra)))
    bias, m, seed = _bias_batch_seed(draw)
    return d, ci, co, kernel, stride, dilation, padding, groups, bias, m, tuple(spatial), seed


@SETTINGS
@given(conv_configs())
def test_conv_hypothesis(cfg):
    d, ci, co, kernel, stride, dilation, padding, groups, bias, m, spatial, seed = cfg
    torch.manual_seed(seed)
    mod = CONV[d](ci, co, kernel, stride=stride, padding=padding, dilation=dilation,
                  groups=groups, bias=bias)
    x = torch.randn((m, ci, *spatial), generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    _check(mod, x, seed + 2, repr(mod))


@st.composite
def conv_transpose_configs(draw):
    """Stride, dilation, padding (up to more than the kernel covers: cropped outputs), output_padding
    (< max(stride, dilation), as torch requires), groups incl. depthwise, bias on/off."""
    d, groups, ci, co, kernel, stride, dilation = _conv_shape(draw)
    spatial = tuple(draw(st.integers(1, 4 if d < 3 else 2)) for _ in range(d))
    out_pad, pads = [], []
    for k, s_, dl, n in zip(kernel, stride, dilation, spatial):
        op = draw(st.integers(0, max(s_, dl) - 1))
        full = (n - 1) * s_ + dl * (k - 1) + op + 1        # the output size at padding 0
        pads.append(draw(st.integers(0, min(2, (full - 1) // 2))))
        out_pad.append(op)
    bias, m, seed = _bias_batch_seed(draw)
    return d, ci, co, kernel, stride, dilation, tuple(pads), tuple(out_pad), groups, bias, m, spatial, seed


@SETTINGS
@given(conv_transpose_configs())
def test_conv_transpose_hypothesis(cfg):
    d, ci, co, kernel, stride, dilation, padding, out_pad, groups, bias, m, spatial, seed = cfg
    torch.manual_seed(seed)
    mod = CONVT[d](ci, co, kernel, stride=stride, padding=padding, output_padding=out_pad, dilation=dilation,
                   groups=groups, bias=bias)
    x = torch.randn((m, ci, *spatial), generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    _check(mod, x, seed + 2, repr(mod))


@st.composite
def linear_configs(draw):
    rank = draw(st.integers(2, 4))
    m = draw(st.integers(2, 4))
    extra = tuple(draw(st.integers(1, 3)) for _ in range(rank - 2))
    fin = draw(st.integers(1, 5))
    fout = draw(st.integers(1, 5))
    bias = draw(st.booleans())
    # freeze one parameter only when another one stays trainable
    frozen = draw(st.sampled_from([None, None, "weight", "bias"] if bias else [None]))
    seed = draw(st.integers(0, 2**31 - 1))
    return m, extra, fin, fout, bias, frozen, seed


@SETTINGS
@given(linear_configs())
def test_linear_hypothesis(cfg):
    m, extra, fin, fout, bias, frozen, seed = cfg
    torch.manual_seed(seed)
    mod = nn.Linear(fin, fout, bias=bias)
    if frozen is not None:
        getattr(mod, frozen).requires_grad_(False)
    x = torch.randn((m, *extra, fin), generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    _check(mod, x, seed + 2, f"{mod!r} frozen={frozen}")


@st.composite
def layernorm_configs(draw):
    n_norm = draw(st.integers(1, 2))
    n_lead = draw(st.integers(0, 2))
    m = draw(st.integers(2, 4))
    norm_shape = tuple(draw(st.integers(1, 4)) for _ in range(n_norm))
    if all(s == 1 for s in norm_shape):  # one element: x_hat == 0; keep the weight part non-trivial
        norm_shape = norm_shape[:-1] + (2,)
    lead = tuple(draw(st.integers(1, 3)) for _ in range(n_lead))
    bias = draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    seed = draw(st.integers(0, 2**31 - 1))
    return m, lead, norm_shape, bias, eps, seed


@SETTINGS
@given(layernorm_configs())
def test_layernorm_hypothesis(cfg):
    m, lead, norm_shape, bias, eps, seed = cfg
    mod = nn.LayerNorm(norm_shape, eps=eps, bias=bias)
    x = torch.randn((m, *lead, *norm_shape), generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    _check(mod, x, seed + 2, repr(mod))


@st.composite
def channel_norm_configs(draw):
    """(kind, d, channels, groups, spatial, m, eps, mode, tracked, frozen, seed) for the channel norms."""
    kind = draw(st.sampled_from(["batch", "group", "instance"]))
    d = draw(st.integers(0 if kind != "instance" else 1, 3))
    groups = draw(st.integers(1, 3))
    channels = groups * draw(st.integers(1, 2)) if kind == "group" else draw(st.integers(1, 4))
    spatial = tuple(draw(st.integers(1, 3)) for _ in range(d))
    one_per_group = kind == "instance" or (kind == "group" and channels == groups)
    if one_per_group and all(s == 1 for s in spatial):   # one element per statistic: torch refuses it
        spatial = spatial[:-1] + (2,) if spatial else (2,)
    m = draw(st.integers(2, 4))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    mode = draw(st.sampled_from(["train", "eval"]))
    tracked = draw(st.booleans())
    frozen = draw(st.sampled_from([None, None, "weight", "bias"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return kind, d, channels, groups, spatial, m, eps, mode, tracked, frozen, seed


@SETTINGS
@given(channel_norm_configs())
def test_channel_norm_hypothesis(cfg):
    kind, d, channels, groups, spatial, m, eps, mode, tracked, frozen, seed = cfg
    gen = torch.Generator().manual_seed(seed + 3)
    if kind == "batch":
        mod = BATCHNORM[max(d, 1)](channels, eps=eps, track_running_stats=tracked)   # d = 0: [N, C]
    elif kind == "group":
        mod = nn.GroupNorm(groups, channels, eps=eps)
    else:
        mod = INSTANCENORM[d](channels, eps=eps, affine=True, track_running_stats=tracked)
    if getattr(mod, "running_mean", None) is not None:
        mod.running_mean.copy_(torch.randn(channels, generator=gen))
        mod.running_var.copy_(torch.rand(channels, generator=gen) + 0.5)
    mod.train(mode == "train")
    if frozen is not None:
        getattr(mod, frozen).requires_grad_(False)
    x = torch.randn((m, channels, *spatial), generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    view = None
    if kind == "batch" and (mode == "train" or not tracked):
        view = batch_stat_view              # samples coupled: x_hat held fixed
    elif kind == "instance" and mode == "train" and tracked:
        view = _untracked                   # same output; vmap cannot update running stats in place
    _check(mod, x, seed + 2, f"{mod!r} mode={mode} frozen={frozen}", view=view)


def _untracked(module: nn.Module, x: torch.Tensor):
    """A training InstanceNorm's oracle: a copy without running statistics (per-sample statistics
    either way; the copy's forward only skips the running-statistics update)."""
    twin = copy.deepcopy(module)
    twin.running_mean = twin.running_var = None
    return twin, x


@st.composite
def rmsnorm_configs(draw):
    n_norm = draw(st.integers(1, 2))
    n_lead = draw(st.integers(0, 2))
    m = draw(st.integers(2, 4))
    norm_shape = tuple(draw(st.integers(1, 4)) for _ in range(n_norm))
    lead = tuple(draw(st.integers(1, 3)) for _ in range(n_lead))
    eps = draw(st.sampled_from([None, 1e-5, 0.1]))
    seed = draw(st.integers(0, 2**31 - 1))
    return m, lead, norm_shape, eps, seed


@SETTINGS
@given(rmsnorm_configs())
def test_rmsnorm_hypothesis(cfg):
    m, lead, norm_shape, eps, seed = cfg
    mod = nn.RMSNorm(norm_shape, eps=eps)
    x = torch.randn((m, *lead, *norm_shape), generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    _check(mod, x, seed + 2, repr(mod))
