"""TENGraD(model)'s defaults: prior="soap" with SOAP's step around the rows (step_rule="adam"), lr 3e-3,
damping 0.1, momentum 0.95, no KL clip; the paper's step, TENGraD(model, prior=None), keeps its own
defaults (lr 0.3, damping 1, momentum 0.9, kl_clip 6.4e-3 with the noise ratio). "auto" and None are
resolved by the step rule in use (options.resolve_rule); what the user gives is kept.

The defaults' step is the rule that tests/test_optim_step_rule_adam.py checks against its dense oracle:
here a default-built optimizer must step bit for bit as one given those settings explicitly.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from support.optim_cases import make_batch, make_model
from tengrad.optim import TENGraD, TENGraDError
from tengrad.optim import options


def _build(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TENGraD(make_model("mlp"), **kw)


def _settings(opt) -> tuple:
    g = opt.param_groups[0]
    return opt.prior, opt.step_rule, g["lr"], g["damping"], g["momentum"], opt.kl_clip


@pytest.mark.parametrize("kw,want", [
    ({}, ("soap", "adam", 3e-3, 0.1, 0.95, None)),
    (dict(prior=None), (None, "natural", 0.3, 1.0, 0.9, options.DEFAULT_KL_CLIP)),
    (dict(prior="adam"), ("adam", "natural", 0.3, 1.0, 0.9, options.DEFAULT_KL_CLIP)),
    (dict(prior="soap", kl_clip=1e-2), ("soap", "natural", 0.3, 1.0, 0.9, 1e-2)),
    (dict(step_rule="natural"), ("soap", "natural", 0.3, 1.0, 0.9, options.DEFAULT_KL_CLIP)),
    (dict(prior=None, kl_clip=None), (None, "natural", 0.3, 1.0, 0.9, None)),
    (dict(lr=0.01, damping=0.5, momentum=0.5), ("soap", "adam", 0.01, 0.5, 0.5, None)),
    (dict(prior=None, lr=0.05, momentum=0.0), (None, "natural", 0.05, 1.0, 0.0, options.DEFAULT_KL_CLIP)),
], ids=["defaults", "paper's step", "adam prior", "soap with a KL clip", "natural rule", "no clip",
        "given values", "given values, paper's step"])
def test_defaults_follow_the_step_rule_in_use(kw, want):
    got = _settings(_build(**kw))
    assert got[:2] == want[:2] and got[5] == want[5], got
    assert got[2:5] == pytest.approx(want[2:5]), got


@pytest.mark.parametrize("kw,needle", [
    (dict(step_rule="adam", prior=None), "needs prior='soap'"),
    (dict(step_rule="adam", kl_clip=1e-2), "pass kl_clip=None"),
    (dict(step_rule="heavy"), "step_rule must be 'auto', 'natural' or 'adam'"),
])
def test_contradicting_choices_are_refused_by_name(kw, needle):
    with pytest.raises(TENGraDError, match=needle):
        _build(**kw)


def test_a_default_optimizer_steps_as_the_explicit_rule_bit_for_bit():
    """12 steps (two curvature steps with the eigenbasis, a refresh) of TENGraD(model) against the same
    model under the rule's settings given one by one."""
    explicit = dict(lr=3e-3, damping=0.1, momentum=0.95, kl_clip=None, prior="soap", step_rule="adam",
                    update_freq=10)
    a, b = make_model("mlp"), make_model("mlp")
    b.load_state_dict(a.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts = [TENGraD(a), TENGraD(b, **explicit)]
    gen = torch.Generator().manual_seed(4)
    for _ in range(12):
        x, y = make_batch("mlp", 16, "cross_entropy", gen)
        for model, opt in zip((a, b), opts):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    moved = False
    for p, q, p0 in zip(a.parameters(), b.parameters(), make_model("mlp").parameters()):
        assert torch.equal(p, q)
        moved |= not torch.equal(p, p0)
    assert moved
    assert "prior='soap', step_rule='adam'" in opts[0].explain()


def _trained(**kw):
    model = make_model("conv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = make_batch("conv", 8, "cross_entropy", gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("recorded", [True, False], ids=["rule recorded", "older checkpoint: rule from its state"])
@pytest.mark.parametrize("saved,loading", [(dict(prior=None), {}), ({}, dict(prior=None))],
                         ids=["paper's step into the defaults", "defaults into the paper's step"])
def test_a_checkpoint_of_another_step_rule_is_refused_and_nothing_changes(saved, loading, recorded):
    """torch's load would carry the saved lr into this optimizer's groups: the paper's step's lr 0.3 under
    the defaults' rule. Refused, naming both rules and how to build the right optimizer."""
    _, opt = _trained(**saved)
    sd = opt.state_dict()
    if not recorded:
        del sd["tengrad"]["rule"]
    _, other = _trained(**loading)
    before = (copy.deepcopy(other.state_dict()), [dict(g) for g in other.param_groups])
    with pytest.raises(TENGraDError, match="the state_dict was saved with step_rule="):
        other.load_state_dict(sd)
    after = other.state_dict()
    assert after["tengrad"]["steps"] == before[0]["tengrad"]["steps"]
    assert [g["lr"] for g in other.param_groups] == [g["lr"] for g in before[1]]
    for k, st in before[0]["state"].items():
        assert all(torch.equal(v, after["state"][k][n]) for n, v in st.items() if isinstance(v, torch.Tensor))


def test_a_checkpoint_of_the_same_rule_loads():
    _, opt = _trained()
    model, other = _trained()
    other.load_state_dict(opt.state_dict())
    assert other.step_rule == "adam" and other.param_groups[0]["lr"] == pytest.approx(3e-3)
