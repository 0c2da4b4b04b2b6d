"""``step_rule="adam"``: SOAP's step around TENGraD's rows (docs/experiments/lm-prior-soap.md, "Momentum").

The oracle, float64, written out from the optimizer's docstring:

    m_t = beta m_{t-1} + (1 - beta) g_t (m_0 = 0),  m^_t = m_t / (1 - beta^t)   (beta: ``momentum``)
    d_b = (a / mean_b) (F_b + a D_b)^-1 m^_b,       theta <- theta - lr d       (no heavy ball, no KL clip)

with F_b from torch.func's per-sample gradients of the curvature step, D_b built densely from the prior the
block keeps ((Q_out (x) Q_in) diag(1 / s^2) (Q_out (x) Q_in)^T per rotated weight, diag(1 / s^2) for the
others), and mean_b the mean over the block of sqrt(v) that the kept prior was normalised by; before the
first statistics (the identity prior) d_b = (F_b + a I)^-1 m^_b unscaled, and outside every block
d = m^ / a. On every curvature step the kept prior itself is checked against v with this step's gradient
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
from tengrad.optim.curvature import eigenbasis

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
    bases it is rotated in (None: kept diagonal)."""
    vs, bases = [], []
    for n, p in zip(b.param_names, b.params):
        st = opt.state.get(p, {})
        if eigenbasis.rotatable(p):
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


@pytest.mark.parametrize("kind,k", [("mlp", 1), ("mlp", 3), ("conv", 2), ("tokens", 1), ("tokens", 4)])
def test_adam_rule_is_the_scaled_damped_step_of_adams_first_moment(kind, k):
    model = make_model(kind)
    opt = _opt(model, update_freq=k)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    m = {n: None for n in names}
    kept, rotated_seen, scaled_seen = None, 0, 0
    for s, (x, y) in enumerate(_batches(kind, 12)):        # 12 steps: across the basis refresh after step 10
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        rows = per_sample_grads(model, x, y, "cross_entropy")
        g = {n: t.mean(0) for n, t in rows.items()}
        due = s % k == 0
        oracle_v = {b.name: _folded(opt, b, g) for b in opt.blocks} if due and s > 0 else {}
        opt.zero_grad()
        LOSSES["cross_entropy"](model(x), y).backward()
        opt.step()
        m = {n: g[n] * (1 - BETA1) if m[n] is None else BETA1 * m[n] + (1 - BETA1) * g[n] for n in names}
        m_hat = {n: m[n] / (1 - BETA1 ** (s + 1)) for n in names}
        priors = {b.name: (b.curv.rows.prior, b.curv.rows.prior_mean) for b in opt.blocks}
        if due:
            kept = (fisher_from_grads(rows, names), priors)
        else:
            assert all(priors[n][0] is kept[1][n][0] for n in priors)
        F, kept_priors = kept
        dense, scale = {}, {}
        for b in opt.blocks:
            ops, mean = kept_priors[b.name]
            if ops is None:         # the identity prior before the first statistics: (F + a I)^-1 m^, unscaled
                assert s < k and mean is None, (s, b.name)
                scale.update({n: 1.0 for n in b.param_names})
                continue
            rotated_seen += sum(isinstance(o, eigenbasis.Rotated) for o in ops)
            scale.update({n: DAMPING / float(mean) for n in b.param_names})
            dense.update({n: kept_prior_matrix(o) for o, n in zip(ops, b.param_names)})
            if b.name in oracle_v:          # the kept prior from v with this step's gradient folded in
                vs, bases = oracle_v[b.name]
                sq = [v.sqrt() for v in vs]
                oracle_mean = sum(t.sum() for t in sq) / sum(t.numel() for t in sq)
                assert rel_err(mean, oracle_mean) < 1e-10, (s, b.name)
                for n, t, basis, op in zip(b.param_names, sq, bases, ops):
                    delta = torch.clamp(t / oracle_mean, min=FLOOR)
                    if basis is None:
                        assert rel_err(op, delta.reshape(op.shape) ** -0.5) < 1e-10, (s, n)
                    else:
                        assert rel_err(op.q_out, basis[0]) < 1e-12 and rel_err(op.q_in, basis[1]) < 1e-12
                        assert rel_err(op.s, delta.reshape(op.s.shape) ** -0.5) < 1e-10, (s, n)
                scaled_seen += 1
        d = dense_directions(F, names, {n: g[n].shape for n in names}, m_hat, [b.param_names for b in opt.blocks],
                             DAMPING, [], prior=dense)
        for n, _ in opt.fallback:      # outside every block: d = m^ / a
            d[n] = m_hat[n] / DAMPING
            scale[n] = 1.0
        for n in names:
            err = rel_err(model.get_parameter(n).detach() - theta[n], -LR * scale[n] * d[n])
            assert err < 1e-8, (s, n, err)
    assert rotated_seen > 0 and scaled_seen > 0


def test_adam_rule_keeps_m_and_round_trips_a_checkpoint():
    model = make_model("tokens")
    opt = _opt(model, update_freq=2)
    batches = _batches("tokens", 7)
    for x, y in batches[:5]:
        opt.zero_grad()
        LOSSES["cross_entropy"](model(x), y).backward()
        opt.step()
    p = next(model.parameters())
    assert opt.state[p]["exp_avg_steps"] == 5 and "momentum_buffer" not in opt.state[p]
    twin = copy.deepcopy(model)
    again = _opt(twin, update_freq=2)
    again.load_state_dict(opt.state_dict())
    for x, y in batches[5:]:           # a reuse step (the kept prior and its mean), then a curvature step
        for mdl, o in ((model, opt), (twin, again)):
            o.zero_grad()
            LOSSES["cross_entropy"](mdl(x), y).backward()
            o.step()
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("kw,needle", [
    (dict(prior=None, kl_clip=None), "needs prior='soap'"),
    (dict(prior="adam", kl_clip=None), "needs prior='soap'"),
    (dict(prior="soap"), "pass kl_clip=None"),
    (dict(prior="soap", kl_clip=None, step_rule="sgd"), "step_rule must be 'natural' or 'adam'"),
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
    plain = TENGraD(make_model("mlp"), 0.1).explain()
    assert "step_rule" not in plain and "prior=" not in plain, plain
