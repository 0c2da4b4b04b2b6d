"""Reuse-path blocks of one shape stepped as batched contractions (curvature/grouped.py).

The group's R g and d = beta g + R^T u against each block's own ``Rows.jg`` / ``Rows.jtu`` (float64; a
Linear on tokens, weight and bias; one beta and per-block betas; a loss-scale factor; MC rows repeated
from x), what may join a group, and whole steps against the dense float64 oracle with groups on (the
default) and off (``SMALL = 0``: every block on its own products)."""
import pytest
import torch
from torch import nn

from tengrad.compiler import CompiledLayer
from tengrad.optim.curvature import grouped
from tengrad.optim.curvature.woodbury import Rows

from support.step_oracle import run_against_oracle


def _linears(n: int, r: int, gen: torch.Generator, reps: int = 1, factors=None, bias: bool = True):
    """n Linear(4, 6) blocks on x [r, 3, 4] (gy [reps r, 3, 6]) with their rows and random g."""
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    rows, plans, gs = [], [], []
    for b in range(n):
        plan = CompiledLayer(nn.Linear(4, 6, bias=bias).double(), backend="torch")
        rw = Rows("reuse", r, rand(r, 3, 4), rand(reps * r, 3, 6))
        if factors is not None:
            rw.factor = factors[b]
        rows.append(rw)
        plans.append(plan)
        gs.append([rand(6, 4)] + ([rand(6)] if bias else []))
    return rows, plans, gs


@pytest.mark.parametrize("reps,factors,bias", [(1, None, True), (2, None, True), (1, [1.0, 2.5, 0.4], True),
                                               (1, None, False)], ids=["plain", "mc-reps", "factors", "no-bias"])
def test_group_matches_each_blocks_own_products(reps, factors, bias):
    gen = torch.Generator().manual_seed(0)
    rows, plans, gs = _linears(3, 5, gen, reps, factors, bias)
    keys = {grouped.key(rw, p) for rw, p in zip(rows, plans)}
    assert len(keys) == 1 and None not in keys
    grp = grouped.Group(rows, plans)
    p = grp.stack(gs)
    rg = grp.jg(p)
    assert rg.shape == (3, reps * 5)
    for b in range(3):
        torch.testing.assert_close(rg[b], rows[b].jg(plans[b], gs[b]), rtol=1e-12, atol=1e-12)
    u = torch.randn(3, reps * 5, generator=gen, dtype=torch.float64)
    for beta in ([0.5, 0.5, 0.5], [0.5, 2.0, 1.3]):
        got = grp.direction(p, u, beta)
        for b in range(3):
            want = rows[b].jtu(plans[b], u[b], gs[b], beta=float(beta[b]))
            assert [t.shape for t in got[b]] == [t.shape for t in want]
            for a, w in zip(got[b], want):
                torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12)


def test_only_reuse_rows_of_one_shape_share_a_key():
    gen = torch.Generator().manual_seed(1)
    rows, plans, _ = _linears(2, 5, gen)
    assert grouped.key(rows[0], plans[0]) == grouped.key(rows[1], plans[1])
    wider = CompiledLayer(nn.Linear(4, 7).double(), backend="torch")
    other = Rows("reuse", 5, rows[0].x, torch.randn(5, 3, 7, generator=gen, dtype=torch.float64))
    assert grouped.key(other, wider) not in (None, grouped.key(rows[0], plans[0]))
    fewer = Rows("reuse", 4, rows[0].x[:4], rows[0].gy[:4])           # other rows: another key
    assert grouped.key(fewer, plans[0]) != grouped.key(rows[0], plans[0])
    explicit = rows[0].explicit(plans[0])
    assert grouped.key(explicit, plans[0]) is None                     # an explicit J: stacked.py's business
    conv = CompiledLayer(nn.Conv2d(2, 3, 3).double(), backend="torch")
    crow = Rows("reuse", 2, torch.randn(2, 2, 5, 5, generator=gen, dtype=torch.float64),
                torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64))
    assert grouped.key(crow, conv) is None                             # a convolution's steps are not contractions
    big = Rows("reuse", 5, torch.randn(5, grouped.SMALL // 50, 4, generator=gen, dtype=torch.float64),
               torch.randn(5, grouped.SMALL // 50, 6, generator=gen, dtype=torch.float64))
    assert grouped.key(big, plans[0]) is None                          # a long product: alone


class TokenTower(nn.Module):
    """x [m, 5] -> Linear(5, 8) -> tokens [m, 2, 4] -> three Linear(4, 4) -> mean -> Linear(4, 3): three
    blocks of one shape."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x)).reshape(x.shape[0], 2, 4)
        for lin in (self.a, self.b, self.c):
            h = torch.tanh(lin(h))
        return self.head(h.mean(1))


@pytest.mark.parametrize("small", [grouped.SMALL, 0], ids=["grouped", "per-block"])
@pytest.mark.parametrize("fisher,k", [("empirical", 1), ("empirical", 3), ("mc", 3)])
def test_steps_match_the_oracle_with_and_without_groups(monkeypatch, small, fisher, k):
    monkeypatch.setattr(grouped, "SMALL", small)
    torch.manual_seed(0)
    model = TokenTower().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    # max_jacobian_numel=0: every block keeps x and gy (the reuse path), where groups apply
    opt = run_against_oracle("mlp", fisher, "cross_entropy", k, [6, 6, 5, 6, 6], model=model, max_jacobian_numel=0)
    used = opt.estimator._groups
    assert (len(used) > 0) == (small > 0), used      # the groups ran (or not) as asked
    if small:
        assert sorted(len(g.rows) for g in used) == [3]
    assert ("grouped (curvature/grouped.py)" in opt.explain()) == (small > 0)


@pytest.mark.parametrize("small", [grouped.SMALL, 0], ids=["grouped", "per-block"])
def test_momentum_over_grouped_steps_matches_the_oracle(monkeypatch, small):
    """The group's directions are views of a buffer it keeps across steps: the momentum buffers made
    from them on the first step must be copies (curvature/scratch.py ``keep``), else the next step's
    directions (the group is kept over a cycle of update_freq steps) overwrite the momentum. Oracle:
    buf_t = mu buf_{t-1} + d_t (buf_0 = d_0), d_t the dense float64 solve with the cycle's Fisher and
    step t's gradient, the change -lr buf_t."""
    from support.numerics import rel_err
    from support.step_oracle import expected_steps, fisher_from_grads, per_sample_grads

    monkeypatch.setattr(grouped, "SMALL", small)
    torch.manual_seed(1)
    model = TokenTower().double()
    lr, damping, mu = 0.3, 0.5, 0.9
    from tengrad.optim import TENGraD
    opt = TENGraD(model, lr, damping, momentum=mu, update_freq=3, kl_clip=None, max_jacobian_numel=0,
                  curvature_batch=None, prior=None)
    gen = torch.Generator().manual_seed(3)
    names = [n for n, _ in model.named_parameters()]
    bufs = None
    for step in range(5):
        x, y = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        rows = per_sample_grads(model, x, y, "cross_entropy")
        g = {n: t.mean(0) for n, t in rows.items()}
        if step % 3 == 0:                   # the curvature of this batch, kept for the cycle
            F = fisher_from_grads(rows, names)
        d = {n: v / -lr for n, v in expected_steps(opt, model, F, names, g, lr, damping).items()}
        bufs = d if bufs is None else {n: mu * bufs[n] + d[n] for n in names}
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for n, p in model.named_parameters():
            assert rel_err(p.detach() - before[n], -lr * bufs[n]) < 1e-8, (step, n)
    assert (len(opt.estimator._groups) > 0) == (small > 0)
