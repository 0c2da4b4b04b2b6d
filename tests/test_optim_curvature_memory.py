"""``curvature_memory``: a cap on the curvature kept between steps (curvature/memory.py).

Blocks that would keep an explicit J move to x and gy, largest first, until the kept bytes fit; the step
stays the exact damped step (dense float64 oracle, support/step_oracle.py) on curvature and reuse steps.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from support.numerics import rel_err
from support.optim_cases import TokenLinears
from support.step_oracle import expected_steps, fisher_from_grads, per_sample_grads, step_against_oracle
from tengrad.optim import TENGraD, TENGraDError
from tengrad.optim.curvature import memory, paths


def _model():
    torch.manual_seed(0)
    return TokenLinears().double()


def _batch(seed, m=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, 3, 12, generator=gen, dtype=torch.float64), torch.randint(0, 3, (m,), generator=gen)


def _kept(opt):
    return sum(memory.kept_bytes(b.curv.rows) for b in opt.blocks)


@pytest.mark.parametrize("k", [1, 3])
def test_a_cap_moves_the_largest_explicit_blocks_to_x_and_gy_and_the_step_stays_exact(k):
    free = TENGraD(_model(), lr=0.2, damping=0.5, momentum=0.0, kl_clip=None, update_freq=k, prior=None)
    step_against_oracle(free, free.model, *_batch(0), 0.5)
    explicit = [b for b in free.blocks if b.curv.rows.explicit_held]
    assert len(explicit) >= 2, [b.choice for b in free.blocks]     # the uncapped run keeps J's
    uncapped = _kept(free)
    cap = uncapped - 1                                              # one block must move
    model = _model()
    opt = TENGraD(model, lr=0.2, damping=0.5, momentum=0.0, kl_clip=None, update_freq=k, curvature_memory=cap,
                  curvature_batch=None, prior=None)   # every row: the cap moves forms only
    kept_F = None
    for s in range(2 * k):                  # curvature steps and reuse steps (the Fisher kept from the last)
        x, y = _batch(s)
        rows = per_sample_grads(model, x, y, "cross_entropy")
        names = [n for n, _ in model.named_parameters()]
        if s % k == 0:
            kept_F = fisher_from_grads(rows, names)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        exact = expected_steps(opt, model, kept_F, names, {n: t.mean(0) for n, t in rows.items()}, 0.2, 0.5)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for n, p in model.named_parameters():
            assert rel_err(p.detach() - before[n], exact[n]) <= 1e-8, (s, n)
        assert _kept(opt) <= cap
    reused = [b for b in opt.blocks if b.memory_reuse]
    assert reused and all(b.curv.path == paths.REUSE and "curvature_memory" in b.choice.note for b in reused)
    assert any(b.curv.rows.explicit_held for b in opt.blocks)       # only as many as needed moved
    assert "curvature_memory" in opt.explain()


def test_a_cap_of_zero_moves_every_block_whose_x_and_gy_are_smaller_and_the_step_stays_exact():
    model = _model()
    opt = TENGraD(model, lr=0.2, damping=0.5, momentum=0.0, kl_clip=None, update_freq=1, curvature_memory=0,
                  curvature_batch=None, prior=None)   # every row: the cap moves forms only
    for s in range(2):
        moved, exact, _ = step_against_oracle(opt, model, *_batch(s), 0.5)
        for n in exact:
            assert rel_err(moved[n], exact[n]) <= 1e-8, (s, n)
    moved = [b for b in opt.blocks if b.memory_reuse]      # the two wide Linears (their J is the larger form)
    assert {b.name for b in moved} == {"a", "b"}, [(b.name, b.choice) for b in opt.blocks]
    assert all(not b.curv.rows.explicit_held for b in moved)


def test_curvature_memory_is_validated():
    with pytest.raises(TENGraDError, match="curvature_memory"):
        TENGraD(_model(), curvature_memory=-1, prior=None)
    with pytest.raises(TENGraDError, match="curvature_memory"):
        TENGraD(_model(), curvature_memory="half", prior=None)
