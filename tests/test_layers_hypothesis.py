"""Hypothesis-generated Conv / Linear / LayerNorm configurations against the oracle (float64).

Every order of gram / jvp / vjp (and order=None) plus the per-sample jacobian must agree with
the torch.func oracle to rel err <= 1e-10. Runs are derandomized and bounded (25 examples each).
"""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tengrad
from oracle import compare_plan, per_sample_jacobian, trainable_params

TOL = 1e-10
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _check(module: nn.Module, x: torch.Tensor, seed: int, desc: str) -> None:
    module = module.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in module.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen, dtype=torch.float64))
        y = module(x)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    p = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for _, t in trainable_params(module)]
    u = torch.randn(x.shape[0], generator=gen, dtype=torch.float64)
    J = per_sample_jacobian(module, x, gy)
    plan = tengrad.compile(module)
    failures = compare_plan(plan, module, x, gy, J, p, u, TOL)
    assert not failures, f"{desc} x{tuple(x.shape)}:\n  " + "\n  ".join(failures)


@st.composite
def conv_configs(draw):
    d = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    ci = groups * draw(st.integers(1, 2))
    co = groups * draw(st.integers(1, 2))
    max_k = 3 if d < 3 else 2
    kernel = tuple(draw(st.integers(1, max_k)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(d))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(d))
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
    bias = draw(st.booleans())
    m = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**31 - 1))
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
