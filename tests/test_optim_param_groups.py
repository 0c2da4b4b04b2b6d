"""Param groups: each block steps with its group's lr, damping, momentum and weight decay.

Every step is checked against the dense float64 oracle of support/step_oracle.py (per-sample gradients
from torch.func, F_b from them): change_b = -lr_g buf_b with buf_b = mu_g buf_b + (F_b + a_g I)^-1 (g_b +
wd_g theta_b), where the group values are read from ``opt.param_groups`` just before the step (so a
scheduler's or a user's change is what the oracle expects). Fallback parameters: d = (g + wd theta)/a_g.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from support.numerics import rel_err
from support.optim_cases import make_batch, make_model
from support.step_oracle import dense_directions, oracle_fisher, per_sample_grads
from tengrad.optim import TENGraD, TENGraDError

EXACT = dict(update_freq=1, kl_clip=None, prior=None)   # curvature every step, no KL clipping, D = I


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def tokens_groups(model):
    return [{"params": [model.emb.weight, model.norm.weight, model.norm.bias], "lr": 0.1, "damping": 0.7,
             "weight_decay": 0.05},
            {"params": model.lin1.parameters(), "lr": 0.3, "damping": 0.2, "momentum": 0.5}]


def run_groups(model, opt, kind, sizes, k=1, scheduler=None, before_step=None, tol=1e-8):
    """Steps with the plain backward, each checked against the oracle; returns the group values seen."""
    gen = torch.Generator().manual_seed(3)
    group_of = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
    pname = {id(p): n for n, p in model.named_parameters()}
    bufs: dict[str, torch.Tensor] = {}
    seen = []
    F_stored = names = None
    for s, m in enumerate(sizes):
        if before_step is not None:
            before_step(s, opt)
        x, y = make_batch(kind, m, "cross_entropy", gen)
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        hp = [{k_: g[k_] for k_ in ("lr", "damping", "momentum", "weight_decay")} for g in opt.param_groups]
        seen.append(hp)
        g_mean = {n: t.mean(0) for n, t in per_sample_grads(model, x, y, "cross_entropy").items()}
        if s % k == 0:
            F_stored, names = oracle_fisher(model, x, y, "empirical", "cross_entropy")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        hp_of = {n: hp[group_of[id(p)]] for n, p in model.named_parameters() if id(p) in group_of and p.requires_grad}
        g_wd = {n: g_mean[n] + hp_of[n]["weight_decay"] * theta[n] for n in hp_of}
        d = dense_directions(F_stored, names, {n: theta[n].shape for n in names}, g_wd,
                             [b.param_names for b in opt.blocks if b.param_names],
                             {n: h["damping"] for n, h in hp_of.items()},
                             [n for n, p in opt.fallback if p.requires_grad])
        for n, p in model.named_parameters():
            if not p.requires_grad:                        # frozen: never moves
                assert torch.equal(p.detach(), theta[n]), n
                continue
            h = hp_of[pname[id(p)]]
            bufs[n] = d[n] if n not in bufs or not h["momentum"] else h["momentum"] * bufs[n] + d[n]
            step = bufs[n] if h["momentum"] else d[n]
            err = rel_err(p.detach() - theta[n], -h["lr"] * step) if h["lr"] else float(
                (p.detach() - theta[n]).abs().max())
            assert err < tol, (s, n, err)
    return seen


def test_two_groups_step_equals_the_dense_per_block_oracle():
    model = make_model("tokens")
    opt = TENGraD(model, 0.2, 0.5, momentum=0.0, param_groups=tokens_groups(model), **EXACT)
    assert len(opt.param_groups) == 3                      # lin2 goes to the default group, last
    assert [p for p in opt.param_groups[2]["params"]] == list(model.lin2.parameters())
    assert opt.param_groups[2]["lr"] == 0.2 and opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.param_groups[1]["momentum"] == 0.5 and opt.param_groups[0]["momentum"] == 0.0
    run_groups(model, opt, "tokens", [5, 3, 4])


def test_group_changes_between_steps_are_read_each_step_with_kept_curvature():
    model = make_model("tokens")
    opt = TENGraD(model, 0.2, 0.5, momentum=0.0, update_freq=2, param_groups=tokens_groups(model), kl_clip=None, prior=None)

    def change(s, opt):
        if s == 1:                       # a reuse step: group 1's kept K is refactored for the new damping
            opt.param_groups[1]["damping"] = 0.9
            opt.param_groups[0]["lr"] = 0.05
    run_groups(model, opt, "tokens", [5, 3, 4], k=2, before_step=change)


def test_fallback_parameters_use_their_own_group():
    model = make_model("conv")                               # act (PReLU) has no plan: fallback
    groups = [{"params": [model.act.weight], "lr": 0.05, "damping": 2.0, "weight_decay": 0.1},
              {"params": model.lin.parameters(), "lr": 0.4, "damping": 0.3}]
    opt = quiet(TENGraD, model, 0.2, 0.5, momentum=0.0, param_groups=groups, **EXACT)
    assert [n for n, _ in opt.fallback] == ["act.weight"]
    run_groups(model, opt, "conv", [4, 3])


def test_step_lr_halves_each_group():
    model = make_model("tokens")
    opt = TENGraD(model, 0.2, 0.5, momentum=0.0, param_groups=tokens_groups(model), **EXACT)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen = run_groups(model, opt, "tokens", [4, 3, 5], scheduler=sched)
    assert [h[1]["lr"] for h in seen] == pytest.approx([0.3, 0.15, 0.075])
    assert [h[2]["lr"] for h in seen] == pytest.approx([0.2, 0.1, 0.05])


def test_lambda_lr_warmup_from_zero():
    model = make_model("tokens")
    opt = TENGraD(model, 0.2, 0.5, momentum=0.9, param_groups=tokens_groups(model), **EXACT)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 2))   # lr 0 at the first step
    seen = run_groups(model, opt, "tokens", [4, 3, 5, 4], scheduler=sched)
    assert [h[2]["lr"] for h in seen] == pytest.approx([0.0, 0.1, 0.2, 0.2])


def test_one_cycle_lr_cycles_lr_and_momentum():
    model = make_model("tokens")
    opt = TENGraD(model, 0.2, 0.5, momentum=0.9, param_groups=tokens_groups(model), **EXACT)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.2, 0.4, 0.3], total_steps=5,
                                                cycle_momentum=True, base_momentum=0.6, max_momentum=0.9)
    seen = run_groups(model, opt, "tokens", [4, 3, 5, 4], scheduler=sched)
    moms = [h[0]["momentum"] for h in seen]
    lrs = [h[1]["lr"] for h in seen]
    assert len(set(moms)) >= 3 and min(moms) < 0.75 and moms[0] == pytest.approx(0.9)    # cycled
    assert lrs[0] == pytest.approx(0.4 / 25) and max(lrs) > 0.3 and lrs[-1] < max(lrs)


def test_a_block_straddling_groups_is_refused_by_name():
    model = make_model("tokens")
    with pytest.raises(TENGraDError, match=r"block 'lin1' straddles.*lin1\.weight in param_groups\[0\]"
                                           r".*lin1\.bias in param_groups\[1\]"):
        TENGraD(model, 0.2, 0.5, param_groups=[{"params": [model.lin1.weight], "lr": 0.1}], prior=None)


@pytest.mark.parametrize("groups, needle", [
    (lambda m: [{"params": [m.lin1.weight, m.lin1.bias], "weight_decy": 0.1}], r"unknown key 'weight_decy'"),
    (lambda m: [{"params": [torch.nn.Parameter(torch.zeros(2))]}], r"param_groups\[0\]\['params'\]\[0\] is not a parameter"),
    (lambda m: [{"params": [m.lin2.weight, m.lin2.bias]}, {"params": [m.lin2.bias]}],
     r"'lin2\.bias' is listed in param_groups\[0\] and in param_groups\[1\]"),
    (lambda m: [{"params": list(m.lin2.parameters()), "lr": -1}], r"param_groups\[0\]\['lr'\] must be .*>= 0, got -1"),
    (lambda m: [{"params": list(m.lin2.parameters()), "momentum": 1.5}], r"param_groups\[0\]\['momentum'\] must be.*\[0, 1\)"),
    (lambda m: [{"params": m.lin2}], r"param_groups\[0\]\['params'\] must be an iterable.*module\.parameters"),
    (lambda m: [{"lr": 0.1}], r"param_groups\[0\] has no 'params'"),
    (lambda m: {"params": list(m.parameters())}, r"param_groups must be a list of dicts"),
])
def test_bad_param_groups_are_refused_by_name(groups, needle):
    model = make_model("tokens")
    with pytest.raises(TENGraDError, match=needle):
        TENGraD(model, 0.2, 0.5, param_groups=groups(model), prior=None)


def test_frozen_parameters_listed_in_a_group_stay_there_and_never_move():
    """As in torch.optim, a frozen parameter stays in its group (requires_grad is read at each step)."""
    model = make_model("tokens")
    model.norm.bias.requires_grad_(False)
    opt = TENGraD(model, 0.2, 0.5, momentum=0.0, param_groups=tokens_groups(model), **EXACT)
    assert any(p is model.norm.bias for g in opt.param_groups for p in g["params"])
    before = model.norm.bias.detach().clone()
    run_groups(model, opt, "tokens", [4])
    assert torch.equal(model.norm.bias, before)


def test_add_param_group_after_construction_is_refused():
    model = make_model("tokens")
    opt = TENGraD(model, 0.2, 0.5, param_groups=tokens_groups(model), **EXACT)
    with pytest.raises(TENGraDError, match="add_param_group after construction"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    assert len(opt.param_groups) == 3
