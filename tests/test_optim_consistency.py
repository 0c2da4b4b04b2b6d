"""The consistency check (tengrad/optim/consistency.py): the three silent cases of issue 8 now raise
naming the layer and leave the parameters untouched; correct models pass (the optimizer oracle
tests run with check=True); gradient clipping passes; check=True re-checks every curvature step."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tengrad
from tengrad_ir import LayerSpec
from tengrad.optim import TENGraD, TENGraDError
from tengrad.optim.consistency import (BatchDimensionError, ConsistencyError, MissingCaptureError,
                                       SpecMismatchError)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def step_raises(model, x, y, error, match, **kwargs):
    opt = TENGraD(model, 0.1, 0.5, **kwargs)
    before = snapshot(model)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(error, match=match) as info:
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "parameters moved"
    assert not any(opt.state[p] for p in model.parameters()), "momentum buffers written"
    return info.value


class TiedHead(nn.Module):
    """Embedding whose weight is also the output head, used functionally (no second module)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.mix = nn.Linear(6, 6)

    def forward(self, ids):                                         # [m, T]
        h = torch.tanh(self.mix(self.emb(ids))).mean(1)             # [m, 6]
        return F.linear(h, self.emb.weight)                         # [m, 10]


class SequenceFirst(nn.Module):
    """A Linear applied to a sequence-first [T, N, d] tensor (T != N)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):                                           # [N, T, 4]
        h = torch.tanh(self.lin(x.transpose(0, 1)))                 # [T, N, 5]
        return self.head(h.mean(0))                                 # [N, 3]


class SquareMap(nn.Module):
    """y = x W^T with a square W, declared below with a transposed (shape-compatible) spec."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d))

    def forward(self, x):
        return x @ self.weight.T


def _transposed_spec(module):
    return [tengrad.Term("weight", LayerSpec.parse("n i, i o -> n o", name="SquareMap.weight"))]


tengrad.register_layer(SquareMap, _transposed_spec)


def test_tied_head_raises_naming_the_embedding():
    torch.manual_seed(0)
    model = TiedHead().double()
    ids = torch.randint(0, 10, (6, 5))
    y = torch.randint(0, 10, (6,))
    err = step_raises(model, ids, y, SpecMismatchError, r"layer 'emb' \(Embedding, spec weight: n \*t v, v d")
    assert "F.linear(h, emb.weight)" in str(err) and isinstance(err, tengrad.TengradError)


def test_sequence_first_linear_raises_naming_the_layer():
    torch.manual_seed(0)
    model = SequenceFirst().double()
    x = torch.randn(3, 7, 4, dtype=torch.float64)                   # N = 3, T = 7
    y = torch.randint(0, 3, (3,))
    step_raises(model, x, y, BatchDimensionError, r"layer 'lin' \(Linear.*leading dimension 7.*batch 3")


def test_contradicting_user_spec_raises_naming_layer_and_spec():
    torch.manual_seed(0)
    model = nn.Sequential(SquareMap(4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    step_raises(model, x, y, SpecMismatchError, r"layer '0' \(SquareMap, spec weight: n i, i o -> n o")


def test_missing_capture_names_a_parameter_used_outside_forward():
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    model = Attn().double()
    with pytest.warns(UserWarning):            # in_proj_weight: no plan for MultiheadAttention
        opt = TENGraD(model, 0.1, 0.5)
    assert "attn.out_proj" in [b.name for b in opt.blocks]
    x = torch.randn(4, 5, 4, dtype=torch.float64)
    F.cross_entropy(model(x), torch.randint(0, 3, (4,))).backward()
    with pytest.raises(MissingCaptureError, match=r"'attn.out_proj'.*used outside the module's forward"):
        opt.step()


def test_correct_models_pass_and_are_checked_once_by_default():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()
    opt = TENGraD(model, 0.1, 0.5, update_freq=2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(5, 2, 6, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 3, (5,), generator=gen)).backward()
        opt.step()
    assert opt._consistency.checked == {"0", "3"}


@pytest.mark.parametrize("check", [False, True])
def test_check_true_rechecks_every_curvature_step(check):
    """A gradient edited per element at the second curvature step is caught only with check=True."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = TENGraD(model, 0.1, 0.5, check=check, update_freq=1)
    gen = torch.Generator().manual_seed(1)
    for s in range(2):
        x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 2, (5,), generator=gen)).backward()
        if s == 1:
            model[0].weight.grad[0].mul_(3.0)
            if check:
                with pytest.raises(SpecMismatchError, match="'0'"):
                    opt.step()
                return
        opt.step()


def test_gradient_clipping_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = TENGraD(model, 0.1, 0.5, check=True)
    x = torch.randn(5, 3, dtype=torch.float64)
    F.cross_entropy(model(x), torch.randint(0, 2, (5,))).backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    assert total > 1e-2                       # the clip really rescaled the gradients
    opt.step()


def test_check_argument_is_validated():
    assert issubclass(ConsistencyError, TENGraDError)
    with pytest.raises(TENGraDError, match="check"):
        TENGraD(nn.Linear(2, 2), 0.1, 0.5, check="always")
