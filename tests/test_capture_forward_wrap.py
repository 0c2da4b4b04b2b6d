"""Capture runs in per-forward instance wrappers (forward_wrap.py): a user's own instance forward on a
captured layer runs inside the wrapper and is put back, wrappers are gone after a forward that raises
and after the backward, a copy of the model (deepcopy, torch.save) taken with or without wrappers is a
plain model, kept wrappers are reused and rebuilt when the module's forward changes, reentrant
activation checkpointing is captured, and a layer called outside the root's forward is refused
by the consistency check naming it. Steps against the dense (F + a I)^-1 g oracle (torch.func rows)."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from support.step_oracle import expected_steps, oracle_fisher
from tengrad.errors import TengradError
from tengrad.optim import TENGraD
from tengrad.optim.capture.wrappers import ForwardWraps, Installed


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(seed=1, m=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (m,), generator=gen)


def _wrapped(model):
    return [n for n, mod in model.named_modules() if "forward" in mod.__dict__]


def _step_matches_the_oracle(opt, model, x, y, before_forward=None, after_backward=None, oracle=None):
    """One TENGraD step (momentum 0, no clip) against -lr (F_b + a I)^-1 g_b per block; the rows from
    ``oracle`` (the same function and parameters, torch.func-friendly) when given."""
    group = opt.param_groups[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    F_dense, names = oracle_fisher(oracle if oracle is not None else model, x, y, "empirical", "cross_entropy")
    if before_forward is not None:
        before_forward()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if after_backward is not None:
        after_backward()
    g = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    exp = expected_steps(opt, model, F_dense, names, g, group["lr"], group["damping"])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - before[n], exp[n], rtol=1e-8, atol=1e-12)


def test_a_users_own_forward_on_a_captured_layer_runs_inside_and_the_step_matches_the_oracle():
    model = _mlp()
    lin = model[2]
    calls = []

    def own(x):                     # the user's instance forward: the class forward, logged
        calls.append(tuple(x.shape))
        return type(lin).forward(lin, x)

    lin.forward = own
    opt = TENGraD(model, lr=0.3, damping=0.5, momentum=0.0, kl_clip=None, check=True, prior=None)
    x, y = _batch()

    def ran_inside_and_was_put_back():
        assert calls == [(7, 6)] and lin.__dict__["forward"] is own and _wrapped(model) == ["2"]

    _step_matches_the_oracle(opt, model, x, y, before_forward=calls.clear,     # the oracle ran it too
                             after_backward=ran_inside_and_was_put_back)
    assert [b.name for b in opt.blocks] == ["0", "2"] and all(b.curv is not None for b in opt.blocks)


def test_no_wrapper_is_left_after_a_forward_that_raises_and_the_next_step_is_exact():
    model = _mlp()
    opt = TENGraD(model, lr=0.3, damping=0.5, momentum=0.0, kl_clip=None, prior=None)
    x, y = _batch()
    with pytest.raises(RuntimeError):
        model(torch.randn(7, 4, dtype=torch.float64))       # wrong width: the first Linear raises
    assert _wrapped(model) == []
    _step_matches_the_oracle(opt, model, x, y)


@pytest.mark.parametrize("when", ["after the forward", "after the backward"])
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_of_the_model_is_a_plain_model(how, when):
    """copy.deepcopy / torch.save of the model while the wrappers are installed (after the forward,
    before its backward) or after the backward (an EMA twin, a checkpoint): the copy computes with its
    own parameters (no wrapper of the original's in it: forward_wrap.Installed copies as the module's
    own forward), TENGraD's hooks in it do nothing (hookset.OwnHook: no half-copied optimizer behind
    them), nothing is recorded for the original's optimizer, and its own TENGraD's step matches the
    oracle."""
    model = _mlp()
    opt = TENGraD(model, lr=0.3, damping=0.5, update_freq=1, prior=None)
    x, y = _batch()

    def copied():
        if how == "deepcopy":
            return copy.deepcopy(model)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    twin = copied() if when == "after the forward" else None
    loss.backward()
    twin = twin if twin is not None else copied()
    opt.step()
    assert _wrapped(model) == []
    assert not any(isinstance(m.__dict__.get("forward"), Installed) for m in twin.modules())
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(-1.5)
        w = dict(twin.named_parameters())
        want = F.linear(torch.tanh(F.linear(x, w["0.weight"], w["0.bias"])), w["2.weight"], w["2.bias"])
    twin.zero_grad()
    out = twin(x)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    F.cross_entropy(out, y).backward()      # nothing recorded for the original's optimizer
    assert all(b.capture.peek() == [] for b in opt.blocks) and opt._capture.ops.uses == []
    _step_matches_the_oracle(TENGraD(twin, lr=0.3, damping=0.5, momentum=0.0, kl_clip=None, prior=None), twin, x, y)


def test_kept_wrappers_are_reused_and_rebuilt_when_the_modules_forward_changes():
    lin = nn.Linear(2, 2)
    made = []

    def make(inner):
        made.append(inner)

        def forward(*a, **k):
            return inner(*a, **k)
        return forward

    wraps = ForwardWraps()
    wraps.install(lin, lambda: [make], "k")
    first = lin.__dict__["forward"]
    wraps.restore()
    assert "forward" not in lin.__dict__
    wraps.install(lin, lambda: [make], "k")
    assert lin.__dict__["forward"] is first and len(made) == 1      # kept: no new closures
    wraps.restore()

    def own(x):
        return -type(lin).forward(lin, x)

    lin.forward = own
    wraps.install(lin, lambda: [make], "k")
    assert lin.__dict__["forward"] is not first and made[-1] is own     # rebuilt around the new forward
    x = torch.randn(3, 2)
    torch.testing.assert_close(lin(x), -F.linear(x, lin.weight, lin.bias))
    wraps.restore()
    assert lin.__dict__["forward"] is own


def test_a_layer_called_outside_the_root_forward_is_refused_naming_it():
    """Its gradient gets a part from a call the capture cannot see (outside the training forward):
    the consistency check on the first curvature step raises and names the layer; nothing moves."""
    model = _mlp()
    opt = TENGraD(model, lr=0.3, damping=0.5, prior=None)
    x, y = _batch()
    opt.zero_grad()
    aux = model[2](torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    (F.cross_entropy(model(x), y) + aux.square().mean()).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TengradError, match="layer '2'"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


class _Checkpointed(nn.Module):
    """Linear -> tanh -> LayerNorm under torch.utils.checkpoint (or not: the oracle), then a Linear."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)
        self.reentrant = reentrant

    def _inner(self, x):
        return self.norm(torch.tanh(self.a(x)))

    def forward(self, x):
        if self.reentrant is None:
            return self.b(self._inner(x))
        return self.b(checkpoint(self._inner, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_activation_checkpointing_is_captured_and_the_steps_match_the_oracle(reentrant):
    """Reentrant checkpointing runs the checkpointed modules' forwards again inside the backward (the
    first run is under no_grad): the wrappers stay until the backward through the forward ends, so
    those calls are the captured ones; two steps, each against the oracle of the same model
    without checkpointing."""
    torch.manual_seed(0)
    model = _Checkpointed(reentrant).double()
    oracle = copy.deepcopy(model)
    oracle.reentrant = None
    opt = TENGraD(model, lr=0.3, damping=0.5, momentum=0.0, kl_clip=None, update_freq=1, check=True, prior=None)
    for seed in (1, 2):
        x, y = _batch(seed)
        x.requires_grad_(reentrant)     # the reentrant variant needs an input that requires grad
        oracle.load_state_dict(model.state_dict())
        _step_matches_the_oracle(opt, model, x, y, oracle=oracle)
        assert _wrapped(model) == [] and all(b.curv is not None for b in opt.blocks), opt.explain()
    assert [b.name for b in opt.blocks] == ["a", "norm", "b"]
