"""Staggered curvature (tengrad/optim/stagger.py) against float64 oracles.

Block i (its index in ``opt.blocks``) refreshes its curvature on step 0 and on the steps t with
(t - i) mod k == 0. Each step must then be, per block, -lr (F_b + a I)^-1 g_b with g_b the gradient of
the step's own batch and F_b the empirical Fisher (torch.func / autograd per-sample gradients) of the
batch of that block's last refresh, at the parameters of that step; fallback parameters -lr g / a.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from support.numerics import rel_err
from support.optim_cases import LOSSES, TiedEncoderLM, ids_batch, lm_loss, make_batch, make_model
from support.step_oracle import (dense_directions, expected_steps, fisher_from_grads, oracle_fisher,
                                 per_sample_grads)
from tengrad.optim import TENGraD
from tengrad.optim.errors import TENGraDError
from tengrad.optim.noise import BETA, FLOOR


def refreshes(step: int, index: int, k: int) -> bool:
    """The documented schedule (stagger.py), written out independently of the optimizer."""
    return step == 0 or (step - index) % k == 0


class FreeHead(torch.nn.Module):
    """Linear -> tanh -> F.linear with a free weight and bias: no module owns them, so they start as
    fallback and become a block of their own (appended last) at the first captured step."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 6)
        self.w = torch.nn.Parameter(0.5 * torch.randn(3, 6))
        self.b = torch.nn.Parameter(0.1 * torch.randn(3))

    def forward(self, x):
        return F.linear(torch.tanh(self.lin(x)), self.w, self.b)


@pytest.mark.parametrize("kind,loss,path", [("tokens", "cross_entropy", "auto"), ("conv", "mse", "auto"),
                                            ("tokens", "cross_entropy", "reuse"), ("conv", "cross_entropy", "reuse"),
                                            ("free", "cross_entropy", "auto")])
def test_staggered_steps_match_the_dense_oracle(kind, loss, path):
    k, lr, damping = 3, 0.3, 0.5
    if kind == "free":
        torch.manual_seed(0)
        model = FreeHead().double()
        kind = "mlp"
    else:
        model = make_model(kind)
    extra = {"max_jacobian_numel": 0} if path == "reuse" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # ConvSeqNet's PReLU falls back
        opt = TENGraD(model, lr, damping, momentum=0.0, update_freq=k, kl_clip=None, check=True,
                      stagger=True, **{"prior": None, "step_rule": "natural", **extra})
    gen = torch.Generator().manual_seed(1)
    fishers, last, names = {}, {}, None
    for s, m in enumerate([4, 6, 5, 3, 5, 6, 4]):
        x, y = make_batch(kind, m, loss, gen)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        g = {n: t.mean(0) for n, t in per_sample_grads(model, x, y, loss).items()}
        fishers[s], names = oracle_fisher(model, x, y, "empirical", loss)
        kept = {b.name: b.curv for b in opt.blocks}
        opt.zero_grad()
        if s % 2:
            opt.backward(model(x), y, loss=loss)
        else:
            LOSSES[loss](model(x), y).backward()
        opt.step()
        fresh = [b.name for b in opt.blocks if b.curv is not kept.get(b.name)]   # new blocks too
        for i, b in enumerate(opt.blocks):
            if refreshes(s, i, k):
                last[b.name] = s
        assert fresh == [b.name for i, b in enumerate(opt.blocks) if refreshes(s, i, k)], (s, fresh)
        assert s == 0 or len(fresh) <= math.ceil(len(opt.blocks) / k)
        want = {}
        for src in set(last.values()):
            exp = expected_steps(opt, model, fishers[src], names, g, lr, damping)
            for b in opt.blocks:
                if last[b.name] == src:
                    want.update({n: exp[n] for n in b.param_names})
            want.update({n: exp[n] for n, _ in opt.fallback})
        for n, p in model.named_parameters():
            err = rel_err(p.detach() - before[n], want[n])
            assert err <= 1e-8, (s, n, err)
    if path == "reuse":
        assert all(b.choice.path == "reuse" for b in opt.blocks)
    if isinstance(model, FreeHead):       # promoted at step 0, then refreshed on its own phase
        assert not opt.fallback and [b.param_names for b in opt.blocks][-1] == ["w", "b"]


def test_staggered_tied_transformer_matches_the_oracle_and_arms_only_what_is_due():
    """Embedding + nn.TransformerEncoder + tied head, k = number of blocks (one block per step after
    step 0): each step against the per-block oracle, and in each forward only the due block's capture runs
    (its module's forward wrapper, forward_wrap.py, installed for that forward and its backward);
    the TorchFunctionMode only when the due block has uses outside the attention (the tied head),
    MultiheadAttention's recording only when it has uses inside."""
    lr, damping = 0.2, 0.3
    torch.manual_seed(0)
    model = TiedEncoderLM(batch_first=True).double()
    oracle = copy.deepcopy(model)
    seen = []
    inner = model.forward

    def forward(ids):           # the root forward runs after the capture's gate: what is armed now
        seen.append((torch._C._len_torch_function_stack() > 0,
                     all("forward" in m.__dict__ for m in mhas),
                     [b.name for b in opt.blocks if b.capture is not None and "forward" in b.module.__dict__]))
        return inner(ids)

    model.forward = forward
    mhas = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # out_bias: fallback until the tied head reads it (then emb's)
        opt = TENGraD(model, lr=lr, damping=damping, momentum=0.0, kl_clip=None, check=True, stagger=True,
                      update_freq=100, prior=None)
    k = opt.update_freq = len(opt.blocks)
    names = [n for n, p in oracle.named_parameters() if p.requires_grad]
    shapes = {n: p.shape for n, p in oracle.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    fishers, last = {}, {}
    for s in range(k + 2):
        (ids,), y = ids_batch(gen)
        oracle.load_state_dict(model.state_dict())
        rows = per_sample_grads(oracle, (ids,), y, lm_loss)
        fishers[s] = fisher_from_grads(rows, names)
        g = {n: t.mean(0) for n, t in rows.items()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        lm_loss(model(ids), y).backward()
        opt.step()
        assert not opt.fallback         # out_bias joined emb's block at step 0
        due = [b for i, b in enumerate(opt.blocks) if refreshes(s, i, k)]
        mode, mha, hooked = seen[-1]
        assert hooked == [b.name for b in due if b.capture is not None], (s, hooked)   # their wrappers only
        assert not any("forward" in m.__dict__ for m in model.modules() if m is not model)   # gone after it
        if s > 0:
            (b,) = due
            assert mode == (b.name == "emb"), (s, b.name, mode)            # the tied head: F.linear at the root
            assert mha == ("self_attn" in b.name), (s, b.name, mha)        # in_proj and out_proj: inside MHA
        for b in due:
            last[b.name] = s
        for b in opt.blocks:       # each block: the Fisher of its last refresh, this step's gradient
            d = dense_directions(fishers[last[b.name]], names, shapes, g, [b.param_names], damping)
            for n in b.param_names:
                err = rel_err(model.get_parameter(n).detach() - before[n], -lr * d[n])
                assert err <= 1e-8, (s, n, err)


def test_the_noise_ratio_sums_a_whole_cycle():
    """k = 2 on the token model (4 blocks): step 0 refreshes all (one update), step 1 blocks 1 and 3
    (no update: the cycle is incomplete), step 2 blocks 0 and 2 (an update with blocks 1, 3 from batch 1
    and 0, 2 from batch 2). T = sum_b mean_i |j_bi|^2, Q = sum_b |mean_i j_bi|^2 from torch.func rows."""
    model = make_model("tokens")
    opt = TENGraD(model, 0.3, 0.5, momentum=0.0, update_freq=2, kl_clip=None, stagger=True, prior=None)
    gen = torch.Generator().manual_seed(0)
    m = 6
    per_block = []          # per step: {block name: (T_b, Q_b)}
    states = []
    for s in range(3):
        x, y = make_batch("tokens", m, "cross_entropy", gen)
        rows = per_sample_grads(model, x, y, "cross_entropy")
        stats = {}
        for b in opt.blocks:
            flat = torch.cat([rows[n].reshape(m, -1) for n in b.param_names], dim=1)
            stats[b.name] = (float(flat.square().sum(1).mean()), float(flat.mean(0).square().sum()))
        per_block.append(stats)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        states.append(opt.estimator.noise.state())
    names = [b.name for b in opt.blocks]
    assert states[1] == states[0]                       # step 1: half a cycle, no update
    cycles = [{n: per_block[0][n] for n in names},
              {n: per_block[1 if i % 2 else 2][n] for i, n in enumerate(names)}]
    noise = square = None
    for c in cycles:
        t, q = sum(v[0] for v in c.values()), sum(v[1] for v in c.values())
        n = m / (m - 1) * max(t - q, 0.0)
        noise = n if noise is None else BETA * noise + (1 - BETA) * n
        square = q if square is None else BETA * square + (1 - BETA) * q
    assert states[2]["noise"] == pytest.approx(noise, rel=1e-9)
    assert states[2]["square"] == pytest.approx(square, rel=1e-9)
    assert states[2]["s"] == pytest.approx(min(1.0, max(FLOOR, (square - noise / m) / square)), rel=1e-9)


def test_a_checkpoint_resumes_the_schedule():
    """A staggered optimizer saved after step 1 and loaded into a fresh one continues exactly."""
    def run(split):
        model = make_model("tokens")
        opt = TENGraD(model, 0.3, 0.5, update_freq=3, stagger=True, prior=None)
        gen = torch.Generator().manual_seed(0)
        for s in range(5):
            if s == split:
                sd, ms = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
                model = make_model("tokens", seed=7)
                model.load_state_dict(ms)
                opt = TENGraD(model, 0.3, 0.5, update_freq=3, stagger=True, prior=None)
                opt.load_state_dict(sd)
            x, y = make_batch("tokens", 5, "cross_entropy", gen)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(None), run(2)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_bad_stagger_settings_are_refused():
    model = make_model("tokens")
    with pytest.raises(TENGraDError, match="stagger must be True or False"):
        TENGraD(model, stagger="yes", prior=None)
    with pytest.raises(TENGraDError, match="stagger=True needs fisher='empirical'"):
        TENGraD(model, fisher="mc", stagger=True, prior=None)


def test_explain_says_staggered():
    opt = TENGraD(make_model("tokens"), stagger=True, prior=None)
    assert "stagger=True" in opt.explain()
    assert "stagger" not in TENGraD(make_model("tokens"), prior=None).explain()


@pytest.mark.parametrize("staggered", [False, True])
def test_remove_hooks_leaves_no_hook_behind(staggered):
    """After some steps (block hook sets on and off in turn), remove_hooks() takes every hook of the
    optimizer off every module, whichever sets were switched off at the time."""
    torch.manual_seed(0)
    model = TiedEncoderLM(batch_first=True).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, update_freq=3, stagger=staggered, prior=None)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        (ids,), y = ids_batch(gen)
        opt.zero_grad()
        lm_loss(model(ids), y).backward()
        opt.step()
    (ids,), y = ids_batch(gen)
    model(ids)      # the gate has switched the sets for step 3: emb's on (due), others off when staggered
    opt.remove_hooks()
    left = [(n, len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()
            if m._forward_pre_hooks or m._forward_hooks]
    assert not left, left
