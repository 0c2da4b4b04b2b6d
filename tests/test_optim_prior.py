"""``prior="adam"``: the step is the exact (F_b + a D_b)^-1 g_b for Adam's diagonal prior D_b (issue 24,
item 3; tengrad/optim/curvature/prior.py).

Oracle (float64, written out here from the docstring's definition, not from the optimizer's code):
per-sample gradients from torch.func give F_b (support/step_oracle.py) and g; the second moments are
tracked here, v_0 = g_0^2, v_t = beta v_{t-1} + (1 - beta) g_t^2 after each step; at a curvature step
delta is taken from v of the steps before it (g_0^2 on step 0) and kept for the cycle:

* explicit-J rows: delta = max(sqrt(v) / mean_b sqrt(v), floor) per entry;
* x/gy rows of a Linear or a Conv with groups 1: delta[o, i, k] = d_out[o] d_in[i] with
  d_out = max(sqrt(r) / mean sqrt(r), floor), r[o] = mean_{i,k} v[o, i, k], d_in likewise from the means
  over (o, k); the bias takes d_out;
* other x/gy rows whose J exceeds max_jacobian_numel: delta = 1.

The form a block takes (explicit or x/gy) is the path the optimizer reports; the values of delta and
the step are the oracle's own. The dense solve is (F_b + a diag(delta_b))^-1 g_b per block.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from support.numerics import rel_err
from support.optim_cases import LOSSES, make_batch, make_model
from support.step_oracle import dense_directions, fisher_from_grads, per_sample_grads
from tengrad.optim import TENGraD, TENGraDError

BETA, FLOOR, LR, DAMPING = 0.9, 0.05, 0.3, 0.5


def _normalised(t):
    s = t.sqrt()
    return torch.clamp(s / s.mean(), min=FLOOR)


def oracle_delta(block, v: dict, form: str) -> dict:
    """{param name: delta} of one block in the given form ("explicit", "kronecker" or "identity")."""
    names = block.param_names
    if form == "identity":
        return {n: torch.ones_like(v[n]) for n in names}
    if form == "explicit":
        sq = {n: v[n].sqrt() for n in names}
        mean = sum(t.sum() for t in sq.values()) / sum(t.numel() for t in sq.values())
        return {n: torch.clamp(sq[n] / mean, min=FLOOR) for n in names}
    w = v[names[0]]
    d_out = _normalised(w.mean(dim=tuple(range(1, w.dim()))))
    d_in = _normalised(w.mean(dim=tuple(d for d in range(w.dim()) if d != 1)))
    shape_out = (-1,) + (1,) * (w.dim() - 1)
    shape_in = (1, -1) + (1,) * (w.dim() - 2)
    out = {names[0]: d_out.reshape(shape_out) * d_in.reshape(shape_in) * torch.ones_like(w)}
    if len(names) > 1:
        out[names[1]] = d_out
    return out


def form_of(block) -> str:
    rows = block.curv.rows
    if rows.explicit_held:
        return "explicit"
    is_kron = isinstance(block.module, nn.Linear) or (isinstance(block.module, (nn.Conv1d, nn.Conv2d))
                                                      and block.module.groups == 1)
    return "kronecker" if is_kron else "identity"


@pytest.mark.parametrize("kind,k,max_numel", [("mlp", 2, 2 ** 26), ("mlp", 1, 0), ("conv", 2, 2 ** 26),
                                              ("conv", 2, 0), ("tokens", 3, 2 ** 26), ("tokens", 1, 0)])
def test_prior_step_is_the_exact_damped_step_for_adams_diagonal(kind, k, max_numel):
    model = make_model(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, LR, DAMPING, momentum=0.0, update_freq=k, kl_clip=None, check=True,
                      prior="adam", prior_beta=BETA, prior_floor=FLOOR, max_jacobian_numel=max_numel)
    gen = torch.Generator().manual_seed(3)
    v: dict[str, torch.Tensor] = {}
    kept = None
    forms_seen = set()
    for s, m in enumerate([6, 5, 8, 6]):
        x, y = make_batch(kind, m, "cross_entropy", gen)
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        rows = per_sample_grads(model, x, y, "cross_entropy")
        g = {n: t.mean(0) for n, t in rows.items()}
        opt.zero_grad()
        LOSSES["cross_entropy"](model(x), y).backward()
        opt.step()
        if s % k == 0:
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            F = fisher_from_grads(rows, names)
            v_now = v if v else {n: g[n] ** 2 for n in names}
            deltas = {}
            for b in opt.blocks:
                form = form_of(b)
                forms_seen.add(form)
                deltas.update(oracle_delta(b, v_now, form))
            kept = (F, names, deltas)
        F, names, deltas = kept
        d = dense_directions(F, names, {n: g[n].shape for n in names}, g, [b.param_names for b in opt.blocks],
                             DAMPING, [n for n, _ in opt.fallback], prior=deltas)
        for n in names:
            err = rel_err(model.get_parameter(n).detach() - theta[n], -LR * d[n])
            assert err < 1e-8, (s, n, err)
        for n in g:
            v[n] = g[n] ** 2 if n not in v else BETA * v[n] + (1 - BETA) * g[n] ** 2
    if max_numel == 0:
        assert "kronecker" in forms_seen, forms_seen
    else:
        assert "explicit" in forms_seen, forms_seen


@pytest.mark.parametrize("prior,kw,freq,resume_at,n", [("adam", dict(max_jacobian_numel=0), 3, 2, 3),
                                                        ("soap", dict(), 2, 3, 5)])
def test_prior_keeps_its_delta_through_a_checkpoint(prior, kw, freq, resume_at, n):
    """A saved optimizer with a prior resumes with the kept D (the next reuse step is the same); "soap"
    resumes on a reuse step of the eigenbasis kept at step 2 (step 0 keeps the identity), with its factors."""
    def make(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TENGraD(model, LR, DAMPING, update_freq=freq, prior=prior, **kw)

    def run(resume: bool):
        model = make_model("tokens")
        opt = make(model)
        gen = torch.Generator().manual_seed(5)
        for s in range(n):
            if resume and s == resume_at:
                sd = copy.deepcopy(opt.state_dict())
                rotated = [t for e in sd["tengrad"]["blocks"].values() for t in e["prior"] or [] if isinstance(t, dict)]
                assert bool(rotated) == (prior == "soap")
                model = copy.deepcopy(model)
                opt = make(model)
                opt.load_state_dict(sd)
            x, y = make_batch("tokens", 6, "cross_entropy", gen)
            opt.zero_grad()
            LOSSES["cross_entropy"](model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        assert rel_err(b, a) < 1e-12


@pytest.mark.parametrize("kw,msg", [(dict(prior="kfac"), "prior must be None, 'adam' or 'soap'"),
                                    (dict(prior="adam", prior_beta=1.0), "prior_beta must be a number in"),
                                    (dict(prior="adam", prior_floor=0.0), "prior_floor must be a number in")])
def test_prior_options_are_checked(kw, msg):
    with pytest.raises(TENGraDError, match=msg):
        TENGraD(make_model("mlp"), **kw)


@pytest.mark.parametrize("prior,given,beta", [("adam", None, 0.999), ("soap", None, 0.95), ("soap", 0.8, 0.8)])
def test_prior_beta_defaults_to_each_priors_own(prior, given, beta):
    """prior_beta=None takes Adam's beta2 for "adam" and SOAP's for "soap"; the second moments of a
    parameter outside the rotations (a bias) follow it: v_2 = b g_1^2 + (1 - b) g_2^2."""
    torch.manual_seed(0)
    model = make_model("mlp")
    opt = TENGraD(model, prior=prior, prior_beta=given, lr=LR, damping=DAMPING)
    assert opt.prior_beta == beta
    bias = [p for p in model.parameters() if p.dim() == 1][-1]
    gen, grads = torch.Generator().manual_seed(3), []
    for _ in range(2):
        x, y = make_batch("mlp", 6, "cross_entropy", gen)
        opt.zero_grad()
        LOSSES["cross_entropy"](model(x), y).backward()
        grads.append(bias.grad.detach().double().clone())
        opt.step()
    expected = beta * grads[0] ** 2 + (1 - beta) * grads[1] ** 2
    assert rel_err(opt.state[bias]["prior_v"].double(), expected) < 1e-6


def test_explain_names_each_blocks_prior():
    """explain() says which blocks scale x and gy, which keep a diagonal D, and which keep the identity."""
    model = make_model("conv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, prior="adam", max_jacobian_numel=0)
    x, y = make_batch("conv", 6, "cross_entropy", torch.Generator().manual_seed(1))
    LOSSES["cross_entropy"](model(x), y).backward()
    opt.step()
    text = opt.explain()
    assert "block conv1 " in text and "Kronecker-diagonal" in text.split("block conv1 ")[1].split("\n")[0]
    line = text.split("block norm ")[1].split("\n")[0]
    assert "identity prior" in line and "max_jacobian_numel" in line, line
