"""plan.vjp_magnitudes(x, gy, u) is |J|^T u: every entry the sum of the magnitudes of the products whose
signed sum is that entry of J^T u, with a norm layer's input taken by magnitude *after* its
normalisation (|x_hat|, not x_hat(|x|)). The optimizer reads it as the rounding scale of a gradient
that cancels (consistency.cancelled: a conv bias before BatchNorm). The oracle writes each layer's
products out by hand in float64 (random inputs, seeded); the last test shows the pre-map order matters.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tengrad

F64 = torch.float64


def _data(module: nn.Module, x_shape: tuple[int, ...], seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=gen, dtype=F64) * 2 + 0.5
    with torch.no_grad():
        y = module(x)
    gy = torch.randn(y.shape, generator=gen, dtype=F64)
    u = torch.rand(x_shape[0], generator=gen, dtype=F64) + 0.1
    return x, gy, u


def _per_sample(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return u.reshape(-1, *([1] * (t.dim() - 1))) * t


def oracle(module: nn.Module, x: torch.Tensor, gy: torch.Tensor, u: torch.Tensor) -> dict[str, torch.Tensor]:
    """|J|^T u per parameter, the products written out."""
    ug = _per_sample(u, gy.abs())
    if isinstance(module, nn.Linear):
        xa = x.abs().reshape(-1, x.shape[-1])
        return {"weight": ug.reshape(-1, gy.shape[-1]).T @ xa, "bias": ug.reshape(-1, gy.shape[-1]).sum(0)}
    if isinstance(module, nn.Conv2d):
        w = torch.nn.grad.conv2d_weight(x.abs(), module.weight.shape, ug, module.stride, module.padding,
                                        module.dilation, module.groups)
        return {"weight": w, "bias": ug.sum((0, 2, 3))}
    if isinstance(module, nn.BatchNorm2d):
        x_hat = F.batch_norm(x, None, None, training=True, eps=module.eps)
        return {"weight": (ug * x_hat.abs()).sum((0, 2, 3)), "bias": ug.sum((0, 2, 3))}
    if isinstance(module, nn.LayerNorm):
        x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        lead = tuple(range(x.dim() - len(module.normalized_shape)))
        return {"weight": (ug * x_hat.abs()).sum(lead), "bias": ug.sum(lead)}
    if isinstance(module, nn.GroupNorm):
        x_hat = F.group_norm(x, module.num_groups, eps=module.eps)
        return {"weight": (ug * x_hat.abs()).sum((0, 2, 3)), "bias": ug.sum((0, 2, 3))}
    raise AssertionError(type(module))


CASES = [
    ("linear", lambda: nn.Linear(7, 5), (6, 7)),
    ("linear_seq", lambda: nn.Linear(4, 3), (5, 6, 4)),
    ("conv2d_stride_pad", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (4, 3, 9, 9)),
    ("conv2d_groups_dilation", lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (3, 4, 7, 7)),
    ("batch_norm", lambda: nn.BatchNorm2d(5), (6, 5, 4, 4)),
    ("layer_norm", lambda: nn.LayerNorm(8), (4, 3, 8)),
    ("group_norm", lambda: nn.GroupNorm(2, 6), (4, 6, 3, 3)),
]


@pytest.mark.parametrize("name,make,x_shape", CASES, ids=[c[0] for c in CASES])
def test_vjp_magnitudes_equals_the_products_magnitudes(name, make, x_shape):
    torch.manual_seed(0)
    module = make().to(F64).train()
    with torch.no_grad():           # affine parameters away from their 1 / 0 start
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    x, gy, u = _data(module, x_shape, seed=1)
    got = tengrad.compile(module).vjp_magnitudes(x, gy, u)
    want = oracle(module, x, gy, u)
    names = [n for n, _ in module.named_parameters()]
    assert len(got) == len(names)
    for n, g in zip(names, got):
        torch.testing.assert_close(g, want[n], rtol=1e-12, atol=1e-12, msg=f"{name}.{n}")
        # a bound on |J^T u| entrywise (u >= 0), which the magnitudes must be
        signed = tengrad.compile(module).vjp(x, gy, u)[names.index(n)]
        assert bool((signed.abs() <= g * (1 + 1e-12) + 1e-12).all()), f"{name}.{n}"


def test_the_magnitude_is_taken_after_a_norm_layers_pre_map():
    """x_hat(|x|) (the magnitude before the normalisation) is not |x_hat|: the batch-normalised |x| has
    mean 0 per channel and its products with |gy| cancel, so it would understate the rounding scale."""
    module = nn.BatchNorm2d(5).to(F64).train()
    x, gy, u = _data(module, (6, 5, 4, 4), seed=2)
    plan = tengrad.compile(module)
    right = plan.vjp_magnitudes(x, gy, u)[0]
    before = plan.vjp(x.abs(), gy.abs(), u)[0]
    assert (before - right).abs().max() > 0.1 * right.abs().max()
    assert bool((right > before.abs()).all())


def test_vjp_magnitudes_refuses_a_misshapen_u():
    module = nn.Linear(3, 2).to(F64)
    x, gy, _ = _data(module, (4, 3), seed=3)
    with pytest.raises(tengrad.TengradError, match=r"u must have shape \(4,\)"):
        tengrad.compile(module).vjp_magnitudes(x, gy, torch.ones(5, dtype=F64))
