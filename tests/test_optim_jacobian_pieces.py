"""The explicit-Jacobian path keeps R = scale * [P_0 | P_1 | ...] (the per-parameter Jacobians as formed,
J / m from the backward pass) instead of a concatenated, rescaled copy (woodbury.BlockCurvature.pieces).

* The step from pieces is the dense float64 oracle -lr (F_b + a I)^-1 g_b, on a curvature step and on a
  reuse step, for a net whose first conv takes J from dL/dy (raw input) and whose second conv and
  linear layers take J from the backward pass (fused).
* A checkpoint keeps the pieces (jac = R / scale, jac_split, jac_scale) and one without those keys
  (R whole, as written before the split) still loads and gives the same next step.
* A jac_split that does not sum to the block's size is refused, naming the block.
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.step_oracle import dense_directions, fisher_from_grads, per_sample_grads
from tengrad.optim import TENGraD, TENGraDError


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, stride=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).double()


def batch(seed, m=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (m,), generator=g)


def dense_step(model, x, y, lr, a):
    """{name: -lr (F_b + a I)^-1 g_b}, F_b = J_b^T J_b / m per module (empirical Fisher, torch.func)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    return _reuse_oracle(model, params, x, y, x, y, lr, a)


def step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_pieces_step_is_the_dense_oracle_on_curvature_and_reuse_steps():
    model = make_net()
    lr, a = 0.1, 0.3
    opt = TENGraD(model, lr, a, momentum=0.0, update_freq=2, kl_clip=None, prior=None)
    for i, seed in enumerate((1, 2, 3)):
        x, y = batch(seed)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        if i != 1:
            want = dense_step(model, x, y, lr, a)
            kept = before
        else:        # reuse step: the curvature of batch 1 at the parameters of then, this gradient
            want = _reuse_oracle(model, kept, *batch(1), x, y, lr, a)
        step(model, opt, x, y)
        for n, p in model.named_parameters():
            err = (p.detach() - before[n] - want[n]).abs().max().item()
            assert err <= 1e-10 * max(1.0, want[n].abs().max().item()), (i, n, err)
        if i != 1:
            assert all(b.curv.pieces is not None for b in opt.blocks), opt.explain()


def _reuse_oracle(model, kept, xc, yc, x, y, lr, a):
    """-lr (F_b(xc, yc; kept) + a I)^-1 g_b(x, y): the curvature of the kept batch at the kept
    parameters, the gradient of this batch at the current ones; one block per module."""
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    F_kept = fisher_from_grads(per_sample_grads(model, xc, yc, "cross_entropy", params=kept), names)
    g = {n: t.mean(0) for n, t in per_sample_grads(model, x, y, "cross_entropy").items()}
    blocks = [[f"{mod}.weight", f"{mod}.bias"] for mod in ("0", "2", "5")]
    d = dense_directions(F_kept, names, shapes, g, blocks, a)
    return {n: -lr * v for n, v in d.items()}


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("old_format", [False, True])
def test_checkpoint_keeps_the_pieces_and_loads_a_whole_r(old_format):
    model = make_net()
    opt = TENGraD(model, 0.1, 0.3, momentum=0.9, update_freq=3, prior=None)
    step(model, opt, *batch(1))
    sd = _roundtrip(opt.state_dict())
    for name, c in sd["tengrad"]["blocks"].items():
        assert c["jac_split"] is not None and c["jac_scale"] == 6.0, name
        if old_format:    # as written before the split: R itself, no split or scale
            c["jac"] = c["jac"] * c.pop("jac_scale")
            del c["jac_split"]
    twin = make_net()
    twin.load_state_dict(model.state_dict())
    opt2 = TENGraD(twin, 0.1, 0.3, momentum=0.9, update_freq=3, prior=None)
    opt2.load_state_dict(sd)
    assert all((b.curv.pieces is None) == old_format for b in opt2.blocks)
    x, y = batch(2)       # a reuse step of both
    step(model, opt, x, y)
    step(twin, opt2, x, y)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        if old_format:
            torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14, msg=n)
        else:
            assert torch.equal(q, p), n


def test_checkpoint_refuses_a_bad_split():
    model = make_net()
    opt = TENGraD(model, 0.1, 0.3, update_freq=3, prior=None)
    step(model, opt, *batch(1))
    sd = _roundtrip(opt.state_dict())
    sd["tengrad"]["blocks"]["2"]["jac_split"] = [5, 5]
    opt2 = TENGraD(make_net(), 0.1, 0.3, update_freq=3, prior=None)
    with pytest.raises(TENGraDError, match="block '2'.*jac_split"):
        opt2.load_state_dict(sd)
    assert all(b.curv is None for b in opt2.blocks)
