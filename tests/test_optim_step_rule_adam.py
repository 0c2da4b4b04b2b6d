"""``step_rule="adam"``: SOAP's step around TENGraD's rows (docs/experiments/lm-prior-soap.md, "Momentum").

The oracle, float64, written out from the optimizer's docstring:

    m_t = beta m_{t-1} + (1 - beta) g_t (m_0 = 0),  m^_t = m_t / (1 - beta^t)   (beta: ``momentum``)
    d_b = (a / mean_b) (F_b + a D_b)^-1 m^_b / max(1, RMS_b),   theta <- theta - lr d   (no heavy ball, no KL clip)

(RMS_b: the root mean square over the block of the d before the clip, Adafactor's update clipping)

with F_b from torch.func's per-sample gradients of the curvature step, D_b built densely from the prior the
block keeps ((Q_out (x) Q_in) diag(1 / s^2) (Q_out (x) Q_in)^T per rotated weight, diag(1 / s^2) for the
others), and mean_b the mean over the block of sqrt(v) that the kept prior was normalised by. Before the
first statistics (the identity prior) d_b = (F_b + a I)^-1 m^_b unscaled; with a J over max_jacobian_numel
D_b = I with mean_b from v' in the block's coordinates (rotated once its eigenbasis exists); a weight too
wide for the eigenbasis takes Adafactor's factored D with its scale c in place of mean_b. Outside every
block Adam's step d = m^ / max(sqrt v', floor mean sqrt v') (v' as below), also clipped to RMS <= 1. On
every curvature step the kept prior itself is checked against v with this step's gradient
folded in, from the state before the step:

    v' = beta2 v + (1 - beta2) (Q_out^T G Q_in)^2  (rotated weights; Adam's v and g^2 for the others),
    mean_b = mean_block sqrt(v'),  s = max(sqrt(v') / mean_b, floor)^-1/2.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from support.numerics import rel_err
from support.optim_cases import LOSSES, make_model
from support.step_oracle import (dense_directions, fisher_from_grads, kept_prior_matrix, per_sample_grads,
                                 prior_batches)
from tengrad.optim import TENGraD, TENGraDError
from tengrad.optim.curvature import eigenbasis, scratch

BETA1, BETA2, FLOOR, LR, DAMPING = 0.9, 0.8, 0.05, 0.3, 0.5


def _opt(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TENGraD(model, LR, DAMPING, momentum=BETA1, kl_clip=None, check=True, prior="soap",
                       prior_beta=BETA2, prior_floor=FLOOR, step_rule="adam", **kw)


def _batches(kind: str, n: int, seed: int = 5):
    return prior_batches(kind, n, seed)


def _folded(opt, b, g: dict) -> tuple[list, list]:
    """The oracle's v' per parameter of block ``b`` (from the optimizer's state before the step) and the
    bases it is rotated in (None: kept diagonal; a rotatable weight before its eigenbasis counts so)."""
    vs, bases = [], []
    for n, p in zip(b.param_names, b.params):
        st = opt.state.get(p, {})
        if eigenbasis.rotatable(p) and "prior_ql" in st:
            q_out, q_in = st["prior_ql"].clone(), st["prior_qr"].clone()
            G = g[n].reshape(p.shape[0], -1)
            rot = q_out.T @ G @ q_in
            vs.append(BETA2 * st["prior_v"].reshape(rot.shape) + (1 - BETA2) * rot ** 2)
            bases.append((q_out, q_in))
        else:
            v = st["prior_v"].clone() if "prior_v" in st else g[n] ** 2
            vs.append(BETA2 * v + (1 - BETA2) * g[n] ** 2)
            bases.append(None)
    return vs, bases


def _mean_sqrt(vs: list) -> torch.Tensor:
    sq = [v.sqrt() for v in vs]
    return sum(t.sum() for t in sq) / sum(t.numel() for t in sq)


def _check_kept_prior(ops, mean, vs, bases, form: str, where) -> None:
    """The kept prior of one block against the oracle's v' (module docstring). ``form``: "eigen" (SOAP's
    D), "kronecker" (Adafactor's factored sqrt(v') of the weight: delta_out, delta_in and their scale c) or
    "identity" (D = I, the block's mean of sqrt(v'))."""
    if form == "start":
        assert ops is None and mean is None, where
        return
    if form == "identity":
        assert ops is None and rel_err(mean, _mean_sqrt(vs)) < 1e-10, where
        return
    if form == "kronecker":
        v = vs[0]
        r, c = v.mean(dim=1), v.mean(dim=0)                 # weight [o, i]: row and column means
        d_out = torch.clamp(r.sqrt() / r.sqrt().mean(), min=FLOOR)
        d_in = torch.clamp(c.sqrt() / c.sqrt().mean(), min=FLOOR)
        assert rel_err(ops[0], torch.outer(d_out, d_in) ** -0.5) < 1e-10, where
        assert all(rel_err(o, d_out ** -0.5) < 1e-10 for o in ops[1:]), where      # the bias: delta_out
        assert rel_err(mean, r.sqrt().mean() * c.sqrt().mean() / v.mean().sqrt()) < 1e-10, where
        return
    oracle_mean = _mean_sqrt(vs)
    assert rel_err(mean, oracle_mean) < 1e-10, where
    for t, basis, op in zip(vs, bases, ops):
        delta = torch.clamp(t.sqrt() / oracle_mean, min=FLOOR)
        if basis is None:
            assert rel_err(op, delta.reshape(op.shape) ** -0.5) < 1e-10, where
        else:
            assert rel_err(op.q_out, basis[0]) < 1e-12 and rel_err(op.q_in, basis[1]) < 1e-12
            assert rel_err(op.s, delta.reshape(op.s.shape) ** -0.5) < 1e-10, where


def _run_rule_oracle(model, kind: str, k: int, form, **kw) -> dict:
    """12 steps (across the basis refresh after step 10) of step_rule="adam" against the dense float64
    oracle; ``form(s, block)`` names the prior form the block must keep at curvature step s. Returns how
    many kept priors of each form were checked."""
    opt = _opt(model, update_freq=k, **kw)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    m = {n: None for n in names}
    kept, seen = None, {}
    for s, (x, y) in enumerate(_batches(kind, 12)):
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        rows = per_sample_grads(model, x, y, "cross_entropy")
        g = {n: t.mean(0) for n, t in rows.items()}
        due = s % k == 0
        oracle_v = {b.name: _folded(opt, b, g) for b in opt.blocks} if due else {}
        free_v = {n: BETA2 * (opt.state[p]["prior_v"].clone() if "prior_v" in opt.state.get(p, {}) else g[n] ** 2)
                  + (1 - BETA2) * g[n] ** 2 for n, p in opt.fallback}
        opt.zero_grad()
        LOSSES["cross_entropy"](model(x), y).backward()
        opt.step()
        m = {n: g[n] * (1 - BETA1) if m[n] is None else BETA1 * m[n] + (1 - BETA1) * g[n] for n in names}
        m_hat = {n: m[n] / (1 - BETA1 ** (s + 1)) for n in names}
        priors = {b.name: (b.curv.rows.prior, b.curv.rows.prior_mean) for b in opt.blocks}
        if due:
            kept = (fisher_from_grads(rows, names), priors)
            for b in opt.blocks:        # the kept prior from v with this step's gradient folded in
                f = form(s, b)
                _check_kept_prior(*priors[b.name], *oracle_v[b.name], f, (s, b.name, f))
                seen[f] = seen.get(f, 0) + 1
        else:
            assert all(priors[n][0] is kept[1][n][0] and priors[n][1] is kept[1][n][1] for n in priors)
        F, kept_priors = kept
        dense, scale = {}, {}
        for b in opt.blocks:
            ops, mean = kept_priors[b.name]
            scale.update({n: 1.0 if mean is None else DAMPING / float(mean) for n in b.param_names})
            if ops is not None:         # the identity prior: (a / mean_b) (F + a I)^-1 m^, unscaled at the start
                dense.update({n: kept_prior_matrix(o) for o, n in zip(ops, b.param_names)})
        d = dense_directions(F, names, {n: g[n].shape for n in names}, m_hat, [b.param_names for b in opt.blocks],
                             DAMPING, [], prior=dense)
        for b in opt.blocks:           # Adafactor's update clipping: RMS over the block at most 1
            rms = (sum((scale[n] * d[n]).square().sum() for n in b.param_names)
                   / sum(d[n].numel() for n in b.param_names)).sqrt()
            seen["clipped" if rms > 1 else "unclipped"] = seen.get("clipped" if rms > 1 else "unclipped", 0) + 1
            scale.update({n: scale[n] / max(1.0, float(rms)) for n in b.param_names})
        for n, _ in opt.fallback:      # outside every block Adam's step: m^ / max(sqrt v', floor mean), RMS <= 1
            root = free_v[n].sqrt()
            d[n] = m_hat[n] / torch.clamp(root, min=FLOOR * float(root.mean()))
            scale[n] = 1.0 / max(1.0, float(d[n].square().mean().sqrt()))
            seen["free"] = seen.get("free", 0) + 1
        for n in names:
            err = rel_err(model.get_parameter(n).detach() - theta[n], -LR * scale[n] * d[n])
            assert err < 1e-8, (s, n, err)
    return seen


def _soap_form(s: int, b) -> str:
    """SOAP's D ("eigen"; diagonal for a block with no rotatable weight), but the identity prior ("start")
    on step 0 for a block with a rotatable weight (no eigenbasis yet)."""
    return "start" if s == 0 and any(eigenbasis.rotatable(p) for p in b.params) else "eigen"


@pytest.mark.parametrize("kind,k", [("mlp", 1), ("mlp", 3), ("conv", 2), ("tokens", 1), ("tokens", 4)])
def test_adam_rule_is_the_scaled_damped_step_of_adams_first_moment(kind, k):
    """SOAP's D from the first curvature step after the eigenbasis (step 0: the identity prior, unscaled)."""
    seen = _run_rule_oracle(make_model(kind), kind, k, _soap_form)
    assert seen.get("eigen", 0) > 0 and seen.get("start", 0) > 0, seen
    assert kind != "conv" or seen["free"] == 12, seen        # its PReLU weight is in no block



@pytest.mark.parametrize("kind,k", [("mlp", 3), ("tokens", 4)])
def test_adam_rules_update_clip_binds_in_the_oracle_runs(kind, k):
    """The oracle's clip is exercised both ways (a block's RMS over 1 and under it) in these runs."""
    seen = _run_rule_oracle(make_model(kind), kind, k, _soap_form)
    assert seen.get("clipped", 0) > 0 and seen.get("unclipped", 0) > 0, seen


@pytest.mark.parametrize("large", [False, True])
def test_adam_rule_on_a_block_whose_jacobian_is_too_large_is_scaled_by_its_mean_second_moment(large, monkeypatch):
    """A block whose explicit J exceeds max_jacobian_numel keeps D = I; under the rule its step is still
    (a / mean_b) (F + a I)^-1 m^, with mean_b from v' (rotated coordinates once the eigenbasis exists), not
    m^ / a (which would step it at lr / a beside Adam-scaled blocks). ``large``: every parameter counts as
    large (scratch.MIN_NUMEL 1), where the natural step leaves d unformed (update.Deferred); the rule forms
    it, scaled and clipped."""
    if large:
        monkeypatch.setattr(scratch, "MIN_NUMEL", 1)
    seen = _run_rule_oracle(make_model("mlp"), "mlp", 3, lambda s, b: "identity", max_jacobian_numel=0)
    assert seen["identity"] == 8, seen


def test_adam_rule_under_adafactors_kronecker_prior(monkeypatch):
    """A weight too wide for the eigenbasis (here: every weight, eigenbasis.MAX_DIM 1) on a Linear whose J is
    too large keeps Adafactor's Kronecker-diagonal D; the block scale is its c, so that outside the rows
    the step is m^ / sqrt(r_o c_i / mean v), Adafactor's."""
    monkeypatch.setattr(eigenbasis, "MAX_DIM", 1)
    seen = _run_rule_oracle(make_model("mlp"), "mlp", 3, lambda s, b: "kronecker", max_jacobian_numel=0)
    assert seen["kronecker"] == 8, seen


@pytest.mark.parametrize("kind,kw", [("tokens", {}), ("mlp", dict(max_jacobian_numel=0))])
def test_adam_rule_keeps_m_and_round_trips_a_checkpoint(kind, kw):
    """Also the identity prior's kept mean (mlp with J over max_jacobian_numel)."""
    model = make_model(kind)
    opt = _opt(model, update_freq=2, **kw)
    batches = _batches(kind, 7)
    for x, y in batches[:5]:
        opt.zero_grad()
        LOSSES["cross_entropy"](model(x), y).backward()
        opt.step()
    p = next(model.parameters())
    assert opt.state[p]["exp_avg_steps"] == 5 and "momentum_buffer" not in opt.state[p]
    assert all(b.curv.rows.prior_mean is not None for b in opt.blocks)
    twin = copy.deepcopy(model)
    again = _opt(twin, update_freq=2, **kw)
    again.load_state_dict(opt.state_dict())
    for x, y in batches[5:]:           # a reuse step (the kept prior and its mean), then a curvature step
        for mdl, o in ((model, opt), (twin, again)):
            o.zero_grad()
            LOSSES["cross_entropy"](mdl(x), y).backward()
            o.step()
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("step_rule", ["adam", "natural"])
def test_a_bf16_models_checkpoint_keeps_its_state_in_float32(step_rule):
    """torch's load_state_dict casts optimizer state to the parameter's dtype; TENGraD keeps its state (Adam's m
    or the momentum buffer, the prior's v, factors and bases) in the float32 compute dtype, so the loaded
    state is its saved float32 values again: the twin steps bit for bit as the original (a bf16 cast made
    the eigenbasis factors' next addmm raise on the dtype mismatch)."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(torch.bfloat16)
    kw = dict(step_rule=step_rule, kl_clip=None) if step_rule == "adam" else {}
    make = lambda m: TENGraD(m, 3e-3 if step_rule == "adam" else 0.1, 0.1, momentum=0.9, prior="soap",   # noqa: E731
                             update_freq=2, **{"step_rule": "natural", **kw})
    opt = make(model)
    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 6, generator=gen).to(torch.bfloat16), torch.randint(0, 3, (8,), generator=gen))
               for _ in range(6)]

    def step(m, o, x, y):
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x).float(), y).backward()
        o.step()

    for x, y in batches[:4]:
        step(model, opt, x, y)
    twin = copy.deepcopy(model)
    again = make(twin)
    again.load_state_dict(opt.state_dict())
    w = twin[0].weight
    assert {k: v.dtype for k, v in again.state[w].items() if torch.is_tensor(v)} == \
        {k: v.dtype for k, v in opt.state[model[0].weight].items() if torch.is_tensor(v)}
    assert again.state[w]["prior_l"].dtype == torch.float32
    for x, y in batches[4:]:           # a reuse step, then a curvature step (the bases refreshed from the factors)
        step(model, opt, x, y)
        step(twin, again, x, y)
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("kw,needle", [
    (dict(prior=None, kl_clip=None), "needs prior='soap'"),
    (dict(prior="adam", kl_clip=None), "needs prior='soap'"),
    (dict(prior="soap", kl_clip=1e-2), "pass kl_clip=None"),
    (dict(prior="soap", kl_clip=None, step_rule="sgd"), "step_rule must be 'auto', 'natural' or 'adam'"),
])
def test_adam_rule_refuses_what_it_is_not_built_for(kw, needle):
    kw = dict(dict(step_rule="adam"), **kw)
    with pytest.raises(TENGraDError, match=needle):
        TENGraD(make_model("mlp"), 3e-3, **kw)


def test_a_bad_kept_prior_mean_is_refused_on_load_and_nothing_changes():
    model = make_model("mlp")
    opt = _opt(model, update_freq=3)
    for x, y in _batches("mlp", 4):        # steps 0 and 3 are curvature steps: the second keeps a prior
        opt.zero_grad()
        LOSSES["cross_entropy"](model(x), y).backward()
        opt.step()
    sd = opt.state_dict()
    name, c = next((n, c) for n, c in sd["tengrad"]["blocks"].items() if c.get("prior_mean") is not None)
    c["prior_mean"] = torch.tensor(-1.0, dtype=torch.float64)
    fresh = _opt(make_model("mlp"), update_freq=3)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(TENGraDError, match="'prior_mean' must be a positive finite scalar"):
        fresh.load_state_dict(sd)
    assert str(fresh.state_dict()) == str(before)


def test_explain_names_the_prior_and_the_step_rule():
    model = make_model("mlp")
    opt = _opt(model, update_freq=3)
    text = opt.explain()
    assert "prior='soap'" in text and "step_rule='adam'" in text and "kl_clip=None" in text, text
    plain = TENGraD(make_model("mlp"), 0.1, prior=None).explain()
    assert "step_rule" not in plain and "prior=" not in plain, plain
