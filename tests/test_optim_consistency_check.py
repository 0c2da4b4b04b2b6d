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
from tengrad.optim.curvature.consistency import (BatchDimensionError, ConsistencyError, MissingCaptureError,
                                       SpecMismatchError, UnexplainedGradientError)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def step_raises(model, x, y, error, match, **kwargs):
    opt = TENGraD(model, 0.1, 0.5, **{"prior": None, "step_rule": "natural", **kwargs})
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


def test_tied_head_is_one_exact_block_with_two_uses():
    """Formerly silently wrong, then refused: now one block whose J sums the embedding and the
    F.linear(h, emb.weight) use (exactness against the dense oracle: test_optim_zoo.py)."""
    torch.manual_seed(0)
    model = TiedHead().double()
    opt = TENGraD(model, 0.1, 0.5, check=True, prior=None)
    ids, y = torch.randint(0, 10, (6, 5)), torch.randint(0, 10, (6,))
    F.cross_entropy(model(ids), y).backward()
    opt.step()
    emb = next(b for b in opt.blocks if b.name == "emb")
    assert len(emb.uses) == 2 and any(u.startswith("linear(emb.weight)") for u in emb.uses), emb.uses


def test_sequence_first_linear_takes_the_sample_dimension_from_the_batch():
    """[T, N, d] with T != N: the sample is the dimension of size m (exact: test_optim_zoo.py)."""
    torch.manual_seed(0)
    model = SequenceFirst().double()
    opt = TENGraD(model, 0.1, 0.5, check=True, prior=None)
    x = torch.randn(3, 7, 4, dtype=torch.float64)                   # N = 3, T = 7
    F.cross_entropy(model(x), torch.randint(0, 3, (3,))).backward()
    opt.step()
    assert opt.blocks[0].curv.gram.shape == (3, 3)


def test_sequence_first_linear_with_t_equal_n_raises_naming_the_layer():
    torch.manual_seed(0)
    model = SequenceFirst().double()
    x = torch.randn(3, 3, 4, dtype=torch.float64)                   # N = T = 3: ambiguous
    step_raises(model, x, torch.randint(0, 3, (3,)), BatchDimensionError,
                r"layer 'lin'.*dimensions \[0, 1\] all of size m = 3")


def test_contradicting_user_spec_raises_naming_layer_and_spec():
    torch.manual_seed(0)
    model = nn.Sequential(SquareMap(4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    step_raises(model, x, y, SpecMismatchError, r"layer '0' \(SquareMap, spec weight: n i, i o -> n o")


def test_multihead_attention_out_proj_is_captured_at_its_op():
    """out_proj is applied through F.linear inside F.multi_head_attention_forward: captured there
    ([T*N, E] rows, t-major); in_proj_weight/in_proj_bias are a block from construction, captured at
    their F.linear."""
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    model = Attn().double()
    opt = TENGraD(model, 0.1, 0.5, check=True, prior=None)
    assert not opt.fallback and "attn" in [b.name for b in opt.blocks]
    x = torch.randn(4, 5, 4, dtype=torch.float64)
    F.cross_entropy(model(x), torch.randint(0, 3, (4,))).backward()
    opt.step()
    assert not opt.fallback
    names = {b.name: b for b in opt.blocks}
    assert names["attn.out_proj"].uses == ["linear(attn.out_proj.weight+attn.out_proj.bias)#1"]
    assert "attn" in names and len(names["attn"].params) == 2


def test_correct_models_pass_and_are_checked_once_by_default():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()
    opt = TENGraD(model, 0.1, 0.5, update_freq=2, prior=None)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(5, 2, 6, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 3, (5,), generator=gen)).backward()
        opt.step()
    assert opt._check.checked == {"0", "3"}


@pytest.mark.parametrize("check", [None, False, True])
def test_a_gradient_edited_at_a_later_curvature_step_is_caught_unless_check_is_none(check):
    """A gradient edited per element at the second curvature step: check=True's full J^T 1 / m check
    names it as a spec mismatch; the default's per-step screen (R g against K 1 / m, consistency.screen)
    as a part the rows do not explain; check=None steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = TENGraD(model, 0.1, 0.5, check=check, update_freq=1, prior=None)
    gen = torch.Generator().manual_seed(1)
    for s in range(2):
        x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 2, (5,), generator=gen)).backward()
        if s == 1:
            model[0].weight.grad[0].mul_(3.0)
            if check is not None:
                error = SpecMismatchError if check else UnexplainedGradientError
                with pytest.raises(error, match="'0'"):
                    opt.step()
                assert opt._steps == 1
                return
        opt.step()
    assert opt._steps == 2


def test_gradient_clipping_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = TENGraD(model, 0.1, 0.5, check=True, prior=None)
    x = torch.randn(5, 3, dtype=torch.float64)
    F.cross_entropy(model(x), torch.randint(0, 2, (5,))).backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    assert total > 1e-2                       # the clip really rescaled the gradients
    opt.step()


def test_check_argument_is_validated():
    assert issubclass(ConsistencyError, TENGraDError)
    with pytest.raises(TENGraDError, match="check"):
        TENGraD(nn.Linear(2, 2), 0.1, 0.5, check="always", prior=None)


def test_missing_capture_names_a_parameter_read_only_by_ops_without_a_spec():
    torch.manual_seed(0)

    class Matmul(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return torch.cdist(x, self.lin.weight)   # a Linear's weight, read by an op without a spec
                                                     # (x @ W.T is captured now: linear_ops.py)

    model = Matmul().double()
    opt = TENGraD(model, 0.1, 0.5, prior=None)
    F.cross_entropy(model(torch.randn(5, 4, dtype=torch.float64)), torch.randint(0, 3, (5,))).backward()
    with pytest.raises(MissingCaptureError, match=r"layer 'lin' \(Linear\).*ops without a spec"):
        opt.step()
