"""Small explicit-J blocks stepped together (curvature/stacked.py).

The stack's R g and d = beta g + R^T u against each block's own ``Rows.jg`` / ``Rows.jtu`` (float64,
rows held whole, as scaled pieces, with a loss-scale factor), and whole steps against the dense float64
oracle with the stack on (the default) and off (``SMALL = 0``: every block on its own mat-vecs)."""
import pytest
import torch

from tengrad.optim.curvature import stacked
from tengrad.optim.curvature.woodbury import Rows

from support.step_oracle import run_against_oracle


def _blocks(r: int, gen: torch.Generator, repeat: bool = False):
    """Three blocks' rows and parameter shapes: J whole, scaled pieces, J with a factor; ``repeat``: two
    more of the first and second widths between and after them (runs of several blocks, out of order)."""
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    shapes = [[torch.Size([3, 4]), torch.Size([3])], [torch.Size([5]), torch.Size([5])], [torch.Size([2, 2, 3])]]
    whole = Rows("jacobian", r, jac=rand(r, 15))
    pieces = Rows("jacobian", r, pieces=[rand(r, 5), rand(r, 5)], scale=0.37)
    factored = Rows("jacobian", r, jac=rand(r, 12))
    factored.factor = 2.5
    rows = [whole, pieces, factored]
    if repeat:
        again = Rows("jacobian", r, pieces=[rand(r, 12), rand(r, 3)], scale=1.7)
        again.factor = 0.6
        rows, shapes = (rows[:2] + [again] + rows[2:] + [Rows("jacobian", r, jac=rand(r, 10))],
                        shapes[:2] + [[torch.Size([12]), torch.Size([3])]] + shapes[2:] + [[torch.Size([10])]])
    return rows, shapes


@pytest.mark.parametrize("repeat,same_beta", [(False, False), (True, False), (True, True)],
                         ids=["one-per-width", "runs", "runs-one-beta"])
def test_stack_matches_each_blocks_own_products(repeat, same_beta):
    gen = torch.Generator().manual_seed(0)
    r = 7
    rows, shapes = _blocks(r, gen, repeat)
    gs = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in ss] for ss in shapes]
    us = torch.randn(len(rows), r, generator=gen, dtype=torch.float64)
    beta = [0.5] * len(rows) if same_beta else [0.5, 2.0, 1.3, 0.9, 1.1][:len(rows)]
    st = stacked.Stack(rows, shapes)
    if repeat:
        assert sorted(len(blocks) for blocks, _, _ in st.runs) == [1, 2, 2]
    flat = st.flat(gs)
    got_rg = st.jg(flat)
    got_d = st.direction(flat, us, beta)
    for b, (rw, g) in enumerate(zip(rows, gs)):
        torch.testing.assert_close(got_rg[b], rw.jg(None, g), rtol=1e-13, atol=1e-13)
        want = rw.jtu(None, us[b], g, beta=float(beta[b]))
        assert [t.shape for t in got_d[b]] == [t.shape for t in want]
        for a, w in zip(got_d[b], want):
            torch.testing.assert_close(a, w, rtol=1e-13, atol=1e-13)


def test_stack_refuses_rows_that_do_not_fit_the_parameters():
    gen = torch.Generator().manual_seed(1)
    rows, shapes = _blocks(4, gen)
    with pytest.raises(ValueError, match="stacked block 1"):
        stacked.Stack(rows, [shapes[0], [torch.Size([4])], shapes[2]])
    other = Rows("jacobian", 5, jac=torch.randn(5, 12, generator=gen, dtype=torch.float64))
    with pytest.raises(ValueError, match="stacked block 2: R is 5 x 12, expected 4 x 12"):
        stacked.Stack(rows[:2] + [other], shapes)


def test_stackable_takes_small_plain_explicit_rows_only():
    gen = torch.Generator().manual_seed(2)
    small = Rows("jacobian", 4, jac=torch.randn(4, 8, generator=gen))
    assert stacked.stackable(small)
    assert not stacked.stackable(Rows("jacobian", 4, jac=torch.randn(4, stacked.SMALL // 4 + 1, generator=gen)))
    assert not stacked.stackable(Rows("reuse", 4, x=torch.randn(4, 3, generator=gen), gy=torch.randn(4, 2, generator=gen)))
    prior = Rows("jacobian", 4, jac=torch.randn(4, 8, generator=gen))
    prior.prior = (torch.ones(8),)
    assert not stacked.stackable(prior)


@pytest.mark.parametrize("small", [stacked.SMALL, 0], ids=["stacked", "per-block"])
@pytest.mark.parametrize("kind,fisher,k", [("mlp", "empirical", 1), ("conv", "empirical", 3),
                                           ("token", "empirical", 3), ("mlp", "mc", 3)])
def test_steps_match_the_oracle_with_and_without_the_stack(monkeypatch, small, kind, fisher, k):
    monkeypatch.setattr(stacked, "SMALL", small)
    opt = run_against_oracle(kind, fisher, "cross_entropy", k, [6, 6, 5, 6, 6])
    used = opt.estimator._stacks
    assert (len(used) > 0) == (small > 0), used      # the stack ran (or not) as asked
    assert ("stacked (curvature/stacked.py)" in opt.explain()) == (small > 0)
