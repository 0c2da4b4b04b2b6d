"""The gradient-noise scale of the step (tengrad/optim/noise.py) against float64 oracles.

Oracle: torch.func per-sample gradients j_i of each earlier batch give T = mean_i |j_i|^2 and
Q = |mean_i j_i|^2 over every blocked parameter, hence (running averages, noise.py) s and
r = s / max(s so far); the last step must then be -lr nu d with the dense direction
d = (F_b + a I)^-1 g_b of its own batch and nu = min(1, r sqrt(kl_clip / (lr^2 sum <d, g>))).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from support.numerics import rel_err
from support.optim_cases import make_batch, make_model
from support.step_oracle import per_sample_grads, step_against_oracle, two_steps
from tengrad.optim import TENGraD
from tengrad.optim.errors import TENGraDError
from tengrad.optim.noise import BETA, FLOOR, NoiseScale


def sums(rows: dict[str, torch.Tensor]) -> tuple[float, float, int]:
    """T = mean_i |j_i|^2 and Q = |mean_i j_i|^2 over every parameter, and m."""
    m = next(iter(rows.values())).shape[0]
    flat = torch.cat([r.reshape(m, -1) for r in rows.values()], dim=1)
    return float(flat.square().sum(1).mean()), float(flat.mean(0).square().sum()), m


def oracle_ratio(batches_rows: list[dict]) -> float:
    """r after the curvature steps on these batches (module docstring of noise.py)."""
    noise = square = peak = None
    s = 1.0
    for rows in batches_rows:
        t, q, m = sums(rows)
        n = m / (m - 1) * max(t - q, 0.0)
        noise = n if noise is None else BETA * noise + (1 - BETA) * n
        square = q if square is None else BETA * square + (1 - BETA) * q
        s = min(1.0, max(FLOOR, (square - noise / m) / square))
        peak = s if peak is None else max(peak, s)
    return 1.0 if peak is None else s / peak


def steps_then_oracle(sizes, kl_clip, lr=0.3, damping=0.5):
    """update_freq 1, momentum 0: a step on a batch of each size but the last, then the last step
    compared with the dense oracle. Returns (opt, moved, -lr d, D = sum <d, g>, per-sample rows of
    the earlier batches)."""
    model = make_model("tokens")
    opt = TENGraD(model, lr, damping, momentum=0.0, update_freq=1, kl_clip=kl_clip, prior=None)
    gen = torch.Generator().manual_seed(0)
    seen = []
    for m in sizes[:-1]:
        x, y = make_batch("tokens", m, "cross_entropy", gen)
        seen.append(per_sample_grads(model, x, y, "cross_entropy"))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    moved, exact, dg = step_against_oracle(opt, model, *make_batch("tokens", sizes[-1], "cross_entropy", gen),
                                           damping)
    return opt, moved, exact, dg, seen


SIZES = (12, 6, 6, 12)      # a noisier second and third batch: r < 1 at the last step


@pytest.mark.parametrize("lr", [0.3, 3.0])
def test_the_last_step_is_clipped_at_r_squared_kl_clip(lr):
    kl = 1e-5
    opt, moved, exact, dg, seen = steps_then_oracle(SIZES, kl, lr)
    assert not opt.fallback
    r = oracle_ratio(seen)
    assert FLOOR < r < 0.95                       # the factor is really in play
    nu = min(1.0, r * (kl / (lr * lr * dg)) ** 0.5)
    assert nu < 1.0 and opt.last_nu == pytest.approx(nu, rel=1e-10)
    for n in moved:
        assert rel_err(moved[n], nu * exact[n]) < 1e-8, n
    assert lr * lr * opt.last_nu ** 2 * dg == pytest.approx(r * r * kl, rel=1e-8)


def test_the_first_two_steps_use_r_one():
    """No estimate before the first curvature step, and the first is its own peak."""
    for k in (1, 2):
        kl = 1e-5
        opt, moved, exact, dg, seen = steps_then_oracle(SIZES[:k], kl)
        nu = min(1.0, (kl / (0.3 * 0.3 * dg)) ** 0.5)
        assert opt.last_nu == pytest.approx(nu, rel=1e-10)


def test_without_a_clip_the_step_is_exact_whatever_r():
    opt, moved, exact, _, seen = steps_then_oracle(SIZES, None)
    assert opt.last_nu == 1.0 and oracle_ratio(seen) < 0.95
    for n in moved:
        assert rel_err(moved[n], exact[n]) < 1e-8, n


def test_running_averages_follow_the_formula():
    ns = NoiseScale()
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)     # noqa: E731
    m = 8
    ns.update([f64(3.0), f64(2.0)], [f64(0.5), f64(0.25)], m)       # T 5, Q 0.75
    s1 = 8 / 7 * (5 - 0.75)
    assert (ns.noise, ns.square) == (pytest.approx(s1), pytest.approx(0.75))
    assert ns.s == pytest.approx(max(FLOOR, (0.75 - s1 / m) / 0.75))
    assert ns.peak == ns.s and ns.ratio == 1.0
    first = ns.s
    ns.update([f64(1.0)], [f64(0.6)], m)                            # T 1, Q 0.6
    noise = BETA * s1 + (1 - BETA) * 8 / 7 * 0.4
    square = BETA * 0.75 + (1 - BETA) * 0.6
    assert (ns.noise, ns.square) == (pytest.approx(noise), pytest.approx(square))
    assert ns.s == pytest.approx(min(1.0, max(FLOOR, (square - noise / m) / square)))
    assert ns.peak == max(first, ns.s) and ns.ratio == pytest.approx(ns.s / max(first, ns.s))
    ns.update([f64(9.0)], [f64(0.5)], m)                            # much noisier: s falls below the peak
    assert ns.s < ns.peak and ns.ratio == pytest.approx(ns.s / ns.peak) and ns.ratio < 1.0
    before = ns.state()
    ns.update([f64(float("nan"))], [f64(1.0)], m)                   # a non-finite estimate is skipped
    ns.update([f64(1.0)], [f64(0.0)], m)                            # as is a zero gradient
    assert ns.state() == before


def test_noise_scale_false_keeps_s_at_one_and_bad_values_are_refused():
    opt, *_ = two_steps(lambda opt: None, 1e-5, noise_scale=False)
    assert opt.estimator.noise.s == 1.0 and opt.estimator.noise.ratio == 1.0
    with pytest.raises(TENGraDError, match="noise_scale must be True or False, got 1"):
        TENGraD(make_model("mlp"), noise_scale=1, prior=None)


def test_mc_fisher_rows_are_not_loss_gradients_so_s_stays_one():
    model = make_model("tokens")
    opt = TENGraD(model, update_freq=1, fisher="mc", generator=torch.Generator().manual_seed(0), prior=None)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = make_batch("tokens", 5, "cross_entropy", gen)
        out = model(x)
        opt.zero_grad()
        opt.backward(out, y, loss="cross_entropy")
        opt.step()
    assert opt.estimator.noise.s == 1.0 and opt.estimator.noise.noise is None
    assert "noise_scale=True (r=1: the noise ratio needs the empirical Fisher in one process)" in opt.explain()


def test_the_scale_is_saved_and_loaded_and_older_state_dicts_start_at_one():
    opt, *_ = steps_then_oracle(SIZES, 1e-5)
    sd = opt.state_dict()
    assert sd["tengrad"]["noise"] == opt.estimator.noise.state()
    fresh = TENGraD(copy.deepcopy(opt.model), 0.3, 0.5, momentum=0.0, update_freq=1, kl_clip=1e-5, prior=None)
    fresh.load_state_dict(sd)
    assert fresh.estimator.noise.state() == opt.estimator.noise.state() and fresh.estimator.noise.ratio < 1.0
    old = copy.deepcopy(sd)
    del old["tengrad"]["noise"]
    fresh.load_state_dict(old)
    assert fresh.estimator.noise.ratio == 1.0 and fresh.estimator.noise.noise is None


def test_explain_shows_the_scale():
    model = make_model("mlp")
    opt = TENGraD(model, prior=None)
    assert "noise_scale=True (r=1)" in opt.explain()
    x = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert f"(r={opt.estimator.noise.ratio:.3g})" in opt.explain() and opt.estimator.noise.s < 1.0


def test_explain_says_the_scale_is_unused_without_a_kl_clip():
    """The defaults' rule has no KL clip: the noise ratio it would scale plays no part in the step."""
    assert "noise_scale=True (unused: no KL clip to scale)" in TENGraD(make_model("mlp")).explain()
    assert "noise_scale=True (unused" in TENGraD(make_model("mlp"), prior=None, kl_clip=None).explain()
