"""TENGraD steps on models with the norm layers against the dense float64 oracle of support/step_oracle.py.

The models have no batch-statistics coupling (a BatchNorm kept in eval mode, as in fine-tuning, plus
GroupNorm, InstanceNorm and RMSNorm), so rows of F are per-sample gradients from torch.func.
A MobileNetV2-style block (depthwise conv + BatchNorm in eval mode + ReLU6) is one of issue 8's zoo models.
A training-mode BatchNorm couples the samples; its layer is oracle-tested with x_hat held fixed in
test_layer_cases_vs_oracle.py, and here the optimizer is checked to build its curvature from the batch
statistics of exactly the batch the layer normalised.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.optim_cases import perturb_parameters
from support.step_oracle import run_against_oracle
from tengrad.optim import TENGraD


class NormNet(nn.Module):
    """conv -> BatchNorm2d (eval) -> relu -> GroupNorm -> tanh -> conv -> InstanceNorm2d -> tanh -> RMSNorm
    on the positions as a sequence -> Linear -> mean; input [m, 4, 5, 5], output [m, 3]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.gn = nn.GroupNorm(2, 6)
        self.conv2 = nn.Conv2d(6, 4, 3, bias=False)   # a bias before InstanceNorm has no effect
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.rms = nn.RMSNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.gn(torch.relu(self.bn(self.conv1(x)))))
        h = torch.tanh(self.inorm(self.conv2(h))).flatten(2).transpose(1, 2)   # [m, 9, 4]
        return self.head(self.rms(h)).mean(1)


def norm_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = NormNet().double()
    gen = torch.Generator().manual_seed(seed + 1)
    perturb_parameters(model, gen)
    with torch.no_grad():   # non-default running statistics
        model.bn.running_mean.copy_(torch.randn(6, generator=gen))
        model.bn.running_var.copy_(torch.rand(6, generator=gen) + 0.5)
    model.train()
    model.bn.eval()            # fine-tuning: frozen statistics inside a model that trains
    return model


@pytest.mark.parametrize("fisher", ["empirical", "mc", "exact"])
def test_norm_model_steps_match_dense_oracle(fisher):
    model = norm_net()
    stats = model.bn.running_mean.clone()
    opt = run_against_oracle("conv", fisher, "cross_entropy", k=2, sizes=[5, 4, 3], model=model)
    names = {b.name for b in opt.blocks}
    assert {"bn", "gn", "inorm", "rms"} <= names, names
    assert not opt.fallback
    assert torch.equal(model.bn.running_mean, stats)     # eval mode: statistics untouched


def test_training_batchnorm_uses_the_batch_it_normalised():
    """J^T u of the BatchNorm block equals the fixed-x_hat oracle for the captured batch, and the
    block's J^T 1 / m is the ordinary gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, 0.1, 0.5, momentum=0.0, prior=None)
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    block = next(b for b in opt.blocks if b.name == "1")
    rec = block.capture.peek()[0]
    h = model[0](x).detach()
    assert torch.equal(rec.x, h)
    x_hat = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + model[1].eps)
    gy = 6 * rec.grad
    u = torch.randn(6, dtype=torch.float64)
    got = block.plan.vjp(rec.x, gy, u)
    assert torch.allclose(got[0], (u[:, None] * gy * x_hat).sum(0), rtol=1e-12, atol=1e-12)
    assert torch.allclose(got[1], (u[:, None] * gy).sum(0), rtol=1e-12, atol=1e-12)
    ones = block.plan.vjp(rec.x, gy, torch.ones(6, dtype=torch.float64))
    assert torch.allclose(ones[0] / 6, model[1].weight.grad, rtol=1e-10)
    opt.step()


class InvertedResidual(nn.Module):
    """A MobileNetV2-style block: 1x1 expand -> BN -> ReLU6 -> 3x3 depthwise -> BN -> ReLU6 -> 1x1
    project -> BN, plus the input; then pooling and a Linear head. Input [m, 4, 5, 5], output [m, 3]."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(4, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.project = nn.Conv2d(8, 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu6(self.bn1(self.expand(x)))
        h = F.relu6(self.bn2(self.depthwise(h)))
        return self.head((x + self.bn3(self.project(h))).mean((2, 3)))


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_mobilenet_block_with_eval_batchnorm_matches_dense_oracle(fisher):
    torch.manual_seed(0)
    model = InvertedResidual().double()
    gen = torch.Generator().manual_seed(1)
    perturb_parameters(model, gen)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.running_mean.copy_(0.5 * torch.randn(bn.num_features, generator=gen))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.eval()
    opt = run_against_oracle("conv", fisher, "cross_entropy", k=1, sizes=[5, 3], model=model)
    assert len(opt.blocks) == 7 and not opt.fallback


def test_norms_without_affine_give_no_block_and_no_fallback():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.InstanceNorm2d(3), nn.BatchNorm2d(3, affine=False),
                          nn.GroupNorm(1, 3, affine=False), nn.Flatten(), nn.Linear(27, 2))
    opt = TENGraD(model, 0.1, 0.5, prior=None)
    assert [b.name for b in opt.blocks] == ["0", "5"] and not opt.fallback
