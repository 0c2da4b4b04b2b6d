"""``curvature_batch=c``: the step is the exact damped step of the Fisher of c sampled rows, with the
whole batch's gradient (issue 23, item 3).

Oracle (support/step_oracle.py, float64): per-sample gradients of the batch; F_S = (1/c) sum_{i in S}
r_i r_i^T over the rows S the optimizer drew (``opt.last_curvature_rows``, the same for every block),
g = the mean over all m samples; change = -lr (F_S,b + a I)^-1 g_b per block. Steps 2..k of a cycle use
the stored F_S with the fresh full gradient. The Monte-Carlo Fisher draws its labels for all m samples
and keeps the drawn rows' (``opt.last_labels``).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from support.numerics import rel_err
from support.optim_cases import LOSSES, make_batch, make_model
from support.step_oracle import expected_steps, fisher_from_grads, model_at, per_sample_grads
from tengrad.optim import TENGraD, TENGraDError


@pytest.mark.parametrize("kind,fisher,k", [("mlp", "empirical", 2), ("conv", "empirical", 1), ("tokens", "mc", 2)])
def test_curvature_batch_step_is_the_exact_step_of_the_sampled_rows(kind, fisher, k):
    model = make_model(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, 0.3, 0.5, momentum=0.0, update_freq=k, fisher=fisher, kl_clip=None, check=True,
                      curvature_batch=3, generator=torch.Generator().manual_seed(7), prior=None)
    gen = torch.Generator().manual_seed(2)
    F_stored = names = None
    drawn = []
    for s, m in enumerate([5, 6, 8, 3]):
        x, y = make_batch(kind, m, "cross_entropy", gen)
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        rows = per_sample_grads(model, x, y, "cross_entropy")
        g = {n: t.mean(0) for n, t in rows.items()}
        out = model(x)
        opt.zero_grad()
        if fisher == "empirical":
            LOSSES["cross_entropy"](out, y).backward()
        else:
            opt.backward(out, y, loss="cross_entropy")
        opt.step()
        if s % k == 0:
            idx = opt.last_curvature_rows[m] if m > 3 else torch.arange(m)
            if m > 3:
                assert idx.numel() == 3 and len(set(idx.tolist())) == 3 and opt.last_curvature_rows.keys() == {m}
                drawn.append(idx.tolist())
            else:
                assert opt.last_curvature_rows is None        # m <= c: every row
            labels = y if fisher == "empirical" else opt.last_labels
            sub = per_sample_grads(model_at(model, theta), x[idx], labels[idx], "cross_entropy")
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            F_stored = fisher_from_grads(sub, names)
        want = expected_steps(opt, model, F_stored, names, g, 0.3, 0.5)
        for n, p in model.named_parameters():
            err = rel_err(p.detach() - theta[n], want[n])
            assert err < 1e-8, (s, n, err)
    assert len({tuple(d) for d in drawn}) == len(drawn) or len(drawn) < 2   # fresh draws per curvature step


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_curvature_batch_is_checked(bad):
    with pytest.raises(TENGraDError, match="curvature_batch must be None or an integer >= 1"):
        TENGraD(make_model("mlp"), curvature_batch=bad, prior=None)


def test_the_explicit_jacobian_is_formed_for_the_sampled_rows_only(monkeypatch):
    """A block on the explicit-J path forms J after the sampling, from the c sampled rows' x and gy (the
    gradient then comes from autograd, not from J): the curvature step's J is c x P, never m x P."""
    model = make_model("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, 0.3, 0.5, momentum=0.0, update_freq=1, kl_clip=None, curvature_batch=3,
                      generator=torch.Generator().manual_seed(7), prior=None)
    assert opt.grad_from_jacobian is False
    formed = []
    for b in opt.blocks:
        real = b.plan.jacobian
        monkeypatch.setattr(b.plan, "jacobian", lambda x, gy, _real=real: formed.append(x.shape[0]) or _real(x, gy))
    x, y = make_batch("mlp", 8, "cross_entropy", torch.Generator().manual_seed(3))
    opt.zero_grad()
    LOSSES["cross_entropy"](model(x), y).backward()
    opt.step()
    explicit = [b for b in opt.blocks if b.curv.rows.explicit_held]
    assert explicit and formed and set(formed) == {3}, formed
    assert all(b.curv.m == 3 and b.curv.rows.matrix().shape[0] == 3 for b in explicit)
