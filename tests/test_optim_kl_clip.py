"""Step-size control (KL clipping, on by default) and TENGraD(model)'s defaults.

The clipped step is checked against the dense float64 oracle direction d = (F_b + a I)^-1 g_b:
with D = sum <d, g>, the step is -lr nu d with nu = min(1, sqrt(kl_clip / (lr^2 D))), so its squared
damped-Fisher length lr^2 nu^2 D never exceeds kl_clip; kl_clip=None (and any step inside the bound)
is the exact step.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from support.numerics import rel_err
from support.optim_cases import make_batch, make_model
from support.step_oracle import step_against_oracle, two_steps
from tengrad.optim import TENGraD, options, update
from tengrad.optim.errors import TENGraDError


def one_step(kl_clip, lr=0.3, damping=0.5, **kw):
    model = make_model("tokens")
    opt = TENGraD(model, lr, damping, momentum=0.0, update_freq=1, kl_clip=kl_clip, **{"prior": None, "step_rule": "natural", **kw})
    x, y = make_batch("tokens", 5, "cross_entropy", torch.Generator().manual_seed(0))
    moved, exact, dg = step_against_oracle(opt, model, x, y, damping)     # exact: -lr d, dg: D = sum <d, g>
    return opt, moved, exact, dg, lr


def test_clip_bounds_the_step_in_the_damped_fisher_metric():
    kl = 1e-5
    opt, moved, exact, dg, lr = one_step(kl)
    nu = (kl / (lr * lr * dg)) ** 0.5
    assert nu < 1.0 and opt.last_nu == pytest.approx(nu, rel=1e-10)
    for n in moved:
        assert rel_err(moved[n], nu * exact[n]) < 1e-8, n
    assert lr * lr * opt.last_nu ** 2 * dg == pytest.approx(kl, rel=1e-8)   # on the bound, not past it


@pytest.mark.parametrize("kl_clip", [None, 1e6])
def test_no_clip_or_an_inactive_clip_is_the_exact_step(kl_clip):
    opt, moved, exact, _, _ = one_step(kl_clip)
    assert opt.last_nu == 1.0
    for n in moved:
        assert rel_err(moved[n], exact[n]) < 1e-8, n


def test_kl_scale_formula_and_edge_cases():
    d = torch.tensor([1.0, 2.0], dtype=torch.float64)
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)          # <d, g> = 11
    dirs = [(torch.zeros(2), d, g, {"lr": 0.5})]
    assert update.kl_scale(dirs, 1e-2) == pytest.approx((1e-2 / (0.25 * 11)) ** 0.5)
    assert update.kl_scale(dirs, 100.0) == 1.0
    assert update.kl_scale(dirs, None) == 1.0
    assert update.kl_scale([(torch.zeros(2), -d, g, {"lr": 0.5})], 1e-2) == 1.0   # D <= 0: no clip
    two = dirs + [(torch.zeros(2), d, g, {"lr": 1.0})]             # each parameter with its group's lr
    assert update.kl_scale(two, 1e-2) == pytest.approx((1e-2 / (0.25 * 11 + 11)) ** 0.5)


def test_defaults_are_documented_and_train():
    model = make_model("mlp")
    opt = TENGraD(model, prior=None)
    group = opt.param_groups[0]
    assert (group["lr"], group["damping"], group["momentum"]) == (options.DEFAULT_LR, options.DEFAULT_DAMPING, 0.9)
    assert opt.update_freq == options.DEFAULT_UPDATE_FREQ and opt.kl_clip == options.DEFAULT_KL_CLIP
    text = opt.explain()
    assert f"lr={options.DEFAULT_LR}" in text and f"kl_clip={options.DEFAULT_KL_CLIP}" in text
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()                 # 3 classes, learnable
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # made after step 1
@pytest.mark.parametrize("how", ["StepLR", "by hand"])
def test_a_decayed_lr_shrinks_the_clipped_step(how):
    """While the clip is active, lowering lr 0.3 -> 0.03 makes the step 10x shorter (as SGD's), not the
    same length: nu is measured at the reference lr 0.3 and the step is lr_now nu d."""
    def decay(opt):
        if how == "StepLR":
            torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1).step()
        else:
            opt.param_groups[0]["lr"] *= 0.1
    kl, lr = 1e-5, 0.3
    opt, moved, exact, dg, nu_first = two_steps(decay, kl, lr)
    assert nu_first < 1.0
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * lr)
    nu = (kl / (lr * lr * dg)) ** 0.5
    assert nu < 1.0 and opt.last_nu == pytest.approx(nu, rel=1e-10)
    for n in moved:
        assert rel_err(moved[n], nu * exact[n]) < 1e-8, n            # -0.03 nu d
    length2 = (0.1 * lr) ** 2 * opt.last_nu ** 2 * dg
    assert length2 == pytest.approx(0.01 * kl, rel=1e-8)            # 1/100 of the bound


def test_a_warm_up_scales_the_clipped_step_up_to_the_base_lr():
    """LinearLR(start_factor 0.1): the scheduler's base lr (initial_lr 0.3) is the reference from the
    first step on, so the warm-up's lr 0.03 gives a clipped step 10x shorter than at the base lr."""
    kl, lr, damping = 1e-5, 0.3, 0.5
    model = make_model("tokens")
    opt = TENGraD(model, lr, damping, momentum=0.0, update_freq=1, kl_clip=kl, noise_scale=False, prior=None)
    torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5)
    x, y = make_batch("tokens", 5, "cross_entropy", torch.Generator().manual_seed(0))
    moved, exact, dg = step_against_oracle(opt, model, x, y, damping)          # exact: -0.03 d
    nu = (kl / (lr * lr * dg)) ** 0.5
    assert nu < 1.0 and opt.last_nu == pytest.approx(nu, rel=1e-10)
    for n in moved:
        assert rel_err(moved[n], nu * exact[n]) < 1e-8, n
    assert opt.param_groups[0]["kl_clip_lr"] == lr


def test_a_raised_lr_raises_the_reference_and_the_bound_holds():
    """lr raised by hand above every earlier lr: the reference follows it, the clipped step stays on
    the bound kl_clip (never past it)."""
    kl, lr = 1e-5, 0.3
    def raise_lr(opt):
        opt.param_groups[0]["lr"] = 3 * lr
    opt, moved, exact, dg, _ = two_steps(raise_lr, kl, lr)
    nu = (kl / ((3 * lr) ** 2 * dg)) ** 0.5
    assert opt.last_nu == pytest.approx(nu, rel=1e-10)
    for n in moved:
        assert rel_err(moved[n], nu * exact[n]) < 1e-8, n
    assert (3 * lr) ** 2 * opt.last_nu ** 2 * dg == pytest.approx(kl, rel=1e-8)
    assert opt.param_groups[0]["kl_clip_lr"] == 3 * lr


def test_a_bad_reference_lr_in_a_group_is_refused():
    opt = TENGraD(make_model("mlp"), prior=None)
    opt.param_groups[0]["kl_clip_lr"] = float("nan")
    with pytest.raises(TENGraDError, match=r"param_groups\[0\]\['kl_clip_lr'\]"):
        opt.step()
