"""Parameters in bf16 / fp16 for every registered layer type: one TENGraD step runs, the curvature is
float32, and the step agrees with the same step taken by a float32 copy of the model (same rounded
parameters and input) to the precision of the low-precision forward/backward."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import tengrad
from support.numerics import rel_err
from tengrad.optim import TENGraD

# (layer, input maker): one case per registered module type
LAYERS = {
    nn.Conv1d: (lambda: nn.Conv1d(3, 4, 3, padding=1), lambda g: torch.randn(6, 3, 7, generator=g)),
    nn.Conv2d: (lambda: nn.Conv2d(3, 4, 3, stride=2), lambda g: torch.randn(6, 3, 7, 7, generator=g)),
    nn.Conv3d: (lambda: nn.Conv3d(2, 3, 2), lambda g: torch.randn(6, 2, 3, 4, 3, generator=g)),
    nn.ConvTranspose1d: (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1), lambda g: torch.randn(6, 3, 5, generator=g)),
    nn.ConvTranspose2d: (lambda: nn.ConvTranspose2d(4, 2, 3, stride=2, output_padding=1, groups=2),
                         lambda g: torch.randn(6, 4, 3, 4, generator=g)),
    nn.ConvTranspose3d: (lambda: nn.ConvTranspose3d(2, 3, 2), lambda g: torch.randn(6, 2, 2, 3, 2, generator=g)),
    nn.Linear: (lambda: nn.Linear(5, 4), lambda g: torch.randn(6, 3, 5, generator=g)),
    nn.LayerNorm: (lambda: nn.LayerNorm(5), lambda g: torch.randn(6, 3, 5, generator=g)),
    nn.Embedding: (lambda: nn.Embedding(7, 4, padding_idx=0), lambda g: torch.randint(0, 7, (6, 5), generator=g)),
    nn.BatchNorm1d: (lambda: nn.BatchNorm1d(4), lambda g: torch.randn(6, 4, 5, generator=g)),
    nn.BatchNorm2d: (lambda: nn.BatchNorm2d(3), lambda g: torch.randn(6, 3, 4, 4, generator=g)),
    nn.BatchNorm3d: (lambda: nn.BatchNorm3d(2), lambda g: torch.randn(6, 2, 3, 3, 2, generator=g)),
    nn.GroupNorm: (lambda: nn.GroupNorm(2, 4), lambda g: torch.randn(6, 4, 5, generator=g)),
    nn.InstanceNorm1d: (lambda: nn.InstanceNorm1d(3, affine=True), lambda g: torch.randn(6, 3, 6, generator=g)),
    nn.InstanceNorm2d: (lambda: nn.InstanceNorm2d(3, affine=True), lambda g: torch.randn(6, 3, 4, 4, generator=g)),
    nn.InstanceNorm3d: (lambda: nn.InstanceNorm3d(2, affine=True), lambda g: torch.randn(6, 2, 3, 2, 3, generator=g)),
    nn.RMSNorm: (lambda: nn.RMSNorm(5), lambda g: torch.randn(6, 3, 5, generator=g)),
}
TOL = {torch.bfloat16: 0.1, torch.float16: 0.02}   # vs the float32 direction (rounded forward/backward)


def test_every_registered_layer_has_a_case():
    builtin = {t for t in tengrad.registered_layers() if t.__module__.startswith("torch.nn")}  # not tests' own
    assert builtin <= set(LAYERS), builtin - set(LAYERS)


def _step(layer: nn.Module, x: torch.Tensor, target: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(layer, lr=0.5, damping=1.0, momentum=0.9, prior=None)
    opt.zero_grad()
    out = layer(x)
    ((out.float() - target) ** 2).mean().backward()
    opt.step()
    # the first momentum buffer is the direction d itself, rounded once to the parameter dtype
    # (a parameter's change would also carry the rounding of p - lr d to the parameter's ulp)
    return opt, {n: opt.state[p]["momentum_buffer"].float() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cls", list(LAYERS), ids=[c.__name__ for c in LAYERS])
def test_low_precision_parameters_take_a_float32_curvature_step(cls, dtype):
    make, make_x = LAYERS[cls]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    low = layer.to(dtype)
    ref = copy.deepcopy(low).float()          # float32 twin with the same rounded values
    x = make_x(gen)
    x_low = x.to(dtype) if x.is_floating_point() else x
    x_ref = x_low.float() if x.is_floating_point() else x
    target = torch.randn(ref(x_ref).shape, generator=gen)

    opt, moves = _step(low, x_low, target)
    assert [b.name for b in opt.blocks] == [cls.__name__] and not opt.fallback
    assert opt.blocks[0].curv.gram.dtype == torch.float32
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in low.parameters())
    _, want = _step(ref, x_ref, target)
    for n, w in want.items():
        err = rel_err(moves[n], w)
        assert err < TOL[dtype], f"{cls.__name__}.{n} [{dtype}]: rel err {err:.3g} vs the float32 step"


def test_sparse_embedding_steps_like_the_dense_one():
    """Embedding(sparse=True) hands TENGraD a sparse gradient; the step (made dense) equals the step
    of the same model with a dense embedding, bit for bit in float64, over two steps."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 9, (5, 4), generator=gen), torch.randint(0, 3, (5,), generator=gen))
               for _ in range(2)]
    moved = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(9, 4, sparse=sparse), nn.Flatten(), nn.Linear(16, 3)).double()
        opt = TENGraD(model, lr=0.3, damping=0.5, weight_decay=0.01, prior=None)
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            assert model[0].weight.grad.is_sparse == sparse
            opt.step()
        assert [b.name for b in opt.blocks] == ["0", "2"]
        moved.append(model[0].weight.detach().clone())
    assert torch.equal(moved[0], moved[1])
