"""Directions left unformed (update.Deferred): a large block's d = g / a + R^T u' is added straight into
its momentum buffer (or parameter) after the KL clip's nu is known, <d, g> = |g|^2 / a + u'^T R g.

``scratch.MIN_NUMEL`` is lowered to 1 so the small test models' every block is "large" (the default
defers only blocks with a parameter of 2^20 elements or more), ``stacked.SMALL`` to 0 so that no block
is stepped in a stack instead. Checked: each step against the dense float64 oracle, and whole runs with
momentum, weight decay, a binding KL clip and param groups against the same runs with d formed (the
path of tests/test_optim_scratch.py), which the oracle tests pin down."""
import pytest
import torch

from tengrad.optim import update
from tengrad.optim.curvature import scratch, stacked
from tengrad.optim.estimator import local

from support.step_oracle import run_against_oracle
from test_optim_scratch import _run


@pytest.fixture
def every_block(monkeypatch):
    monkeypatch.setattr(scratch, "MIN_NUMEL", 1)
    monkeypatch.setattr(stacked, "SMALL", 0)
    seen = []
    real = update.Deferred.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(self)
    monkeypatch.setattr(update.Deferred, "__init__", spy)
    return seen


@pytest.mark.parametrize("kind", ["mlp", "conv", "token"])
@pytest.mark.parametrize("k", [1, 3])
def test_deferred_steps_match_the_oracle(every_block, kind, k):
    opt = run_against_oracle(kind, "empirical", "cross_entropy", k, [6, 6, 5, 6])
    assert every_block, "no block was deferred"
    assert opt.estimator._scratch.nbytes() == 0        # no direction buffer was needed


CASES = {
    "momentum, no clip": dict(momentum=0.9, kl_clip=None),
    "momentum, clip binds": dict(momentum=0.9, kl_clip=1e-4),
    "no momentum, clip binds, weight decay": dict(momentum=0.0, kl_clip=1e-4, weight_decay=0.01),
    "momentum, weight decay": dict(momentum=0.9, kl_clip=None, weight_decay=0.01),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_deferred_runs_equal_the_formed_ones(monkeypatch, kind, case):
    monkeypatch.setattr(scratch, "MIN_NUMEL", 1)
    monkeypatch.setattr(stacked, "SMALL", 0)
    monkeypatch.setattr(local, "_deferrable", lambda *a: False)
    want, wopt = _run(kind, 5, **CASES[case])
    monkeypatch.undo()
    monkeypatch.setattr(scratch, "MIN_NUMEL", 1)
    monkeypatch.setattr(stacked, "SMALL", 0)
    got, gopt = _run(kind, 5, **CASES[case])
    if CASES[case]["kl_clip"] is not None:
        assert wopt.last_nu < 1.0 and abs(gopt.last_nu - wopt.last_nu) <= 1e-6 * wopt.last_nu   # the clip binds
    for a, b in zip(want.parameters(), got.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(want.parameters(), got.parameters()):
        sa, sb = wopt.state.get(a, {}), gopt.state.get(b, {})
        assert ("momentum_buffer" in sa) == ("momentum_buffer" in sb)
        if "momentum_buffer" in sa:
            torch.testing.assert_close(sb["momentum_buffer"], sa["momentum_buffer"], rtol=1e-5, atol=1e-6)


def test_deferred_product_is_d_dot_g():
    """<d, g> = beta |g|^2 + u^T R g against the formed d, on an explicit R of two parameters."""
    gen = torch.Generator().manual_seed(0)
    from tengrad.optim.curvature.woodbury import Rows
    jac = torch.randn(5, 12 + 3, generator=gen, dtype=torch.float64)
    rows = Rows("jacobian", 5, jac=jac)
    params = [torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]
    gs = [torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)]
    u = torch.randn(5, generator=gen, dtype=torch.float64)
    d = update.Deferred(rows, None, u, rows.jg(None, gs), 0.7, params, gs)
    formed = rows.jtu(None, u, gs, beta=0.7)
    want = sum(torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(formed, gs))
    torch.testing.assert_close(d.product, want, rtol=1e-12, atol=1e-12)
    targets = [torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)]
    before = [t.clone() for t in targets]
    d.add_to(targets, -0.3)
    for t, b, f in zip(targets, before, formed):
        torch.testing.assert_close(t, b - 0.3 * f, rtol=1e-12, atol=1e-12)
    for decay in (0.9, 0.0):                    # the momentum decay folded into R^T u's product
        before = [t.clone() for t in targets]
        d.add_to(targets, 0.4, decay)
        for t, b, f in zip(targets, before, formed):
            torch.testing.assert_close(t, decay * b + 0.4 * f, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kept", [(True, True), (False, False), (True, False)], ids=["both-kept", "both-new", "mixed"])
def test_apply_forms_the_momentum_of_a_deferred_block(kept):
    """update.apply with a Deferred d: buf = momentum buf + nu d (buf = nu d where none was kept), the
    decay folded into R^T u's product when every buffer of the block is kept or every one is new."""
    gen = torch.Generator().manual_seed(3)
    from tengrad.optim.curvature.woodbury import Rows
    rows = Rows("jacobian", 5, jac=torch.randn(5, 12 + 3, generator=gen, dtype=torch.float64))
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))]
    gs = [torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)]
    u = torch.randn(5, generator=gen, dtype=torch.float64)
    d = update.Deferred(rows, None, u, rows.jg(None, gs), 0.7, params, gs)
    formed = rows.jtu(None, u, gs, beta=0.7)
    group = {"lr": 0.1, "momentum": 0.9}
    state = {p: {} for p in params}
    old = {}
    for p, k in zip(params, kept):
        if k:
            state[p]["momentum_buffer"] = old[p] = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    before = [p.detach().clone() for p in params]
    want_bufs = [(0.9 * old[p].clone() if p in old else 0.0) + 0.5 * f for p, f in zip(params, formed)]
    update.apply(state, [(p, d, g, group) for p, g in zip(params, gs)], nu=0.5)
    for p, b0, w in zip(params, before, want_bufs):
        torch.testing.assert_close(state[p]["momentum_buffer"], w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(p.detach(), b0 - 0.1 * w, rtol=1e-12, atol=1e-12)
