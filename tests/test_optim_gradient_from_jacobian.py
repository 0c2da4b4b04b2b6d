"""Per-step overhead changes keep the step exact: the gradient taken from the per-sample Jacobian
(autograd's weight gradient skipped), the single fused finiteness check and the foreach update."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.optim_cases import make_batch, make_model
from support.step_oracle import run_against_oracle
from tengrad.optim import TENGraD, TENGraDError


def fused_counts(opt):
    return {b.name: b.capture.jacobian_grad_calls for b in opt.blocks}


@pytest.mark.parametrize("k,sizes", [(1, [4, 4, 4]), (2, [4, 4, 4, 4, 4])])
def test_gradient_from_jacobian_matches_dense_oracle(k, sizes):
    # constant batch size: from the second curvature step on, jacobian-path blocks whose input needs
    # grad take g = J^T 1/m from J; every step is still -lr (F_b + a I)^-1 g_b in float64
    opt = run_against_oracle("conv", "empirical", "cross_entropy", k=k, sizes=sizes)
    counts = fused_counts(opt)
    assert counts["conv2"] == 0                       # the network input does not require grad
    fused = [b.name for b in opt.blocks if counts[b.name] > 0]
    assert fused, counts
    assert all(b.choice.path == "jacobian" for b in opt.blocks if b.name in fused)
    curvature_steps = len(range(0, len(sizes), k))
    assert max(counts.values()) == curvature_steps - 1


def test_fused_grad_equals_autograd_grad_and_parameters_are_restored():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).double()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(5, 2, 5, 5, generator=gen, dtype=torch.float64),
                torch.randint(0, 3, (5,), generator=gen)) for _ in range(3)]
    fast, slow = copy.deepcopy(base), copy.deepcopy(base)
    of = TENGraD(fast, 0.1, 0.5, update_freq=1, prior=None)
    os_ = TENGraD(slow, 0.1, 0.5, update_freq=1, grad_from_jacobian=False, prior=None)
    for x, y in batches:
        for model, opt in ((fast, of), (slow, os_)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
        for (n, p), q in zip(fast.named_parameters(), slow.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-12), n
        of.step()
        os_.step()
        for (n, p), q in zip(fast.named_parameters(), slow.parameters()):
            assert torch.allclose(p, q, rtol=1e-10, atol=1e-12), n
    assert fused_counts(of)["2"] == 2 and fused_counts(os_)["2"] == 0
    # the module holds its own Parameter objects again after every forward
    assert fast[2].weight is dict(fast.named_parameters())["2.weight"]
    assert isinstance(fast[2].weight, nn.Parameter)


def test_parameters_restored_when_the_forward_raises():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = TENGraD(model, 0.1, 0.5, update_freq=1, max_jacobian_numel=10 ** 6, prior=None)
    x = torch.randn(6, 3, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.zeros(6, dtype=torch.long)).backward()
        opt.step()
    assert opt.blocks[1].capture.jacobian_grad_shape == (6, 4)
    weight = model[2].weight
    model[2].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        model(x)
    assert model[2].weight is weight and model[2].weight.requires_grad


def test_nonfinite_direction_is_found_after_the_fused_check():
    model = make_model("tokens")
    opt = TENGraD(model, 0.1, 0.5, prior=None)
    x, y = make_batch("tokens", 4, "cross_entropy", torch.Generator().manual_seed(0))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model.lin2.bias.grad[0] = float("inf")
    with pytest.raises(TENGraDError, match="'lin2'.*non-finite gradient"):
        opt.step()
