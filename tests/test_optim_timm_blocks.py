"""timm's building blocks, reproduced (timm's torchvision wheels do not load against the CPU torch here),
trained with ``TENGraD(model)``: no fallback, and a curvature step and a reuse step equal the dense float64
oracle (support/keyword_oracle.py), at batch 8 and 16.

* ``BatchNormAct2d``: a ``BatchNorm2d`` subclass whose own forward applies the activation (no module
  spec: captured at its ``F.batch_norm`` on 4-D input). Kept in eval mode (fine-tuning statistics) so that
  samples do not couple through batch statistics and per-sample gradients are the oracle's rows.
* ``LayerNorm2d``: an ``nn.LayerNorm`` subclass over NCHW (``F.layer_norm`` on a permuted view).
* layer scale (``x * gamma``), squeeze-excite (two 1x1 convs and a gate), depthwise 7x7 convs,
  ``cls_token`` + position embeddings, and a user ``Linear`` subclass that rescales its output.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.keyword_oracle import curvature_and_reuse


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, c):
        super().__init__(c)
        self.act = nn.Hardswish()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return self.act(x)


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ScaledLinear(nn.Linear):
    """A user's Linear variant whose output differs from nn.Linear's."""

    def forward(self, x):
        return 0.5 * super().forward(x) + 1.0


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


class MobileNetV3ish(nn.Module):
    """stem conv + BatchNormAct2d, an inverted residual with depthwise 3x3, squeeze-excite, head."""

    def __init__(self, c=8, classes=3):
        super().__init__()
        self.stem, self.bn1 = nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False), BatchNormAct2d(c)
        self.pw, self.bn2 = nn.Conv2d(c, 2 * c, 1, bias=False), BatchNormAct2d(2 * c)
        self.dw, self.bn3 = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False), BatchNormAct2d(2 * c)
        self.se = SqueezeExcite(2 * c)
        self.pwl = nn.Conv2d(2 * c, c, 1, bias=False)
        self.head = ScaledLinear(c, classes)

    def forward(self, x):
        h = self.bn1(self.stem(x))
        h = h + self.pwl(self.se(self.bn3(self.dw(self.bn2(self.pw(h))))))
        return self.head(h.mean((2, 3)))


class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = LayerNorm2d(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.5))

    def forward(self, x):
        h = self.norm(self.dw(x)).permute(0, 2, 3, 1)
        h = self.fc2(F.gelu(self.fc1(h))).permute(0, 3, 1, 2)
        return x + h * self.gamma


class ConvNeXtish(nn.Module):
    """patchify stem + LayerNorm2d, two ConvNeXt blocks (depthwise 7x7, layer scale), a cls token with
    position embeddings over the 4x4 tokens, a linear head on the cls token."""

    def __init__(self, c=8, classes=3):
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(3, c, 4, stride=4), LayerNorm2d(c)
        self.blocks = nn.Sequential(ConvNeXtBlock(c), ConvNeXtBlock(c))
        self.cls_token = nn.Parameter(torch.randn(1, 1, c) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 17, c) * 0.1)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        h = self.blocks(self.stem_norm(self.stem(x))).flatten(2).transpose(1, 2)      # [m, 16, c]
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos[:, :h.shape[1] + 1]
        return self.head(torch.tanh(h).mean(1) + h[:, 0])


def _net(cls, seed=0):
    torch.manual_seed(seed)
    model = cls().double().train()
    gen = torch.Generator().manual_seed(seed + 7)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5, generator=gen)
            mod.bias.data.normal_(0, 0.1, generator=gen)
            mod.running_mean.normal_(0, 0.1, generator=gen)
            mod.running_var.uniform_(0.5, 1.5, generator=gen)
            mod.eval()                      # running statistics: no coupling between samples
        if isinstance(mod, nn.LayerNorm):
            mod.weight.data.uniform_(0.5, 1.5, generator=gen)
            mod.bias.data.normal_(0, 0.1, generator=gen)
    return model


def _batches(m, size, gen):
    return [{"x": torch.randn(m, 3, size, size, generator=gen, dtype=torch.float64),
             "y": torch.randint(0, 3, (m,), generator=gen)} for _ in range(2)]


def _loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"])


@pytest.mark.parametrize("m", [8, 16])
@pytest.mark.parametrize("cls,size", [(MobileNetV3ish, 8), (ConvNeXtish, 16)], ids=["mobilenetv3", "convnext"])
def test_timm_style_nets_match_dense_oracle(cls, size, m):
    model = _net(cls)
    opt, err = curvature_and_reuse(model, _batches(m, size, torch.Generator().manual_seed(m)), _loss)
    assert not opt.fallback, [n for n, _ in opt.fallback]
    assert err <= 1e-8, err


def test_convnext_at_batch_8_on_8x8_maps_breaks_the_tie_by_provenance():
    """Batch 8 on 8x8 maps: LayerNorm2d's F.layer_norm sees [8, 8, 8, c] (three dims of size m); the
    permuted view of the conv output says which is the sample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), LayerNorm2d(4), nn.Flatten(), nn.Linear(256, 3)).double()
    opt, err = curvature_and_reuse(model, _batches(8, 8, torch.Generator().manual_seed(3)), _loss)
    assert not opt.fallback and err <= 1e-8, err


def test_training_mode_batchnormact_is_captured_at_its_op():
    """In training mode (batch statistics) the subclass is no longer given BatchNorm2d's spec: its
    F.batch_norm is captured, so param.grad stays autograd's and the consistency check passes."""
    model = _net(MobileNetV3ish).train()
    opt = __import__("tengrad").TENGraD(model, check=True, prior=None)
    batch = _batches(8, 8, torch.Generator().manual_seed(0))[0]
    opt.zero_grad()
    _loss(model, batch).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    assert not opt.fallback
    assert {"bn1", "bn2", "bn3", "head"} <= {b.name for b in opt.blocks}
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm"])
def test_parametrized_layer_alone_falls_back_with_its_reason(wrap):
    """weight_norm / spectral_norm on one layer: that layer's parameters keep the damped identity (the
    warning says why, naming the layer), every other layer is an exact block; never the whole optimizer
    refused."""
    import warnings

    import tengrad
    from torch.nn.utils import parametrizations
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), getattr(parametrizations, wrap)(nn.Linear(5, 3))).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = tengrad.TENGraD(model, kl_clip=None, prior=None)
    assert any("2.parametrizations.weight.original" in str(w.message) and "parametrized" in str(w.message)
               for w in caught), [str(w.message) for w in caught]
    fallback = {n for n, _ in opt.fallback}
    assert fallback and all(n.startswith("2.") for n in fallback), fallback
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert [b.name for b in opt.blocks] == ["0"]
    assert all(n.startswith("2.") for n, _ in opt.fallback)
