"""The time rule of ``curvature_batch="auto"`` (curvature/budget.py ``time_rows``): rows are cut when a reuse
step's J g and J^T u, priced by the roofline in the forms the blocks keep, would cost more than TIME_SHARE
of the layers' forward and backward (3 x their forwards).

The roofline is fixed here (F = 1e7 flop/s, B = 1e7 bytes/s: a slow machine, so that the small model's
reuse step is priced over TIME_FLOOR, and flops and bytes weigh alike) so that what the rule picks does
not depend on the machine; each step is checked against the dense float64 oracle for the rows drawn
(test_optim_memory_budget.py's ``_run``)."""
from __future__ import annotations

import math

import pytest
import torch

from tengrad.optim import TENGraD
from tengrad.optim.curvature import budget, paths, roofline
from tengrad.optim.curvature.paths import StepSeconds

from test_optim_memory_budget import M, _model, _run

FIXED = roofline.Roofline(1e7, 1e7)


def test_time_rows_cuts_to_the_share_of_forward_and_backward(monkeypatch):
    monkeypatch.setattr(budget, "TIME_SHARE", 0.1)      # round numbers below; the formula reads the module's
    monkeypatch.setattr(budget, "MIN_ROWS", 4)
    J, R = paths.JACOBIAN, paths.REUSE
    secs = {0: StepSeconds(jacobian=2.0, reuse=6.0, forward=4.0), 1: StepSeconds(jacobian=1.0, reuse=None, forward=6.0)}
    # at c = 32 of 32 rows with block 0 on J: step 3 s against 3 * 10 s; 3 > 0.1 * 30 fails, so no cut
    assert budget.time_rows(secs, {0: J, 1: J}, 32, 32) is None
    # block 0 on x and gy: 7 s > 3 s: c_t = floor(32 * 3 / 7) = 13
    assert budget.time_rows(secs, {0: R, 1: J}, 32, 32) == (13, 7.0, 30.0)
    # at 16 of 32 rows (the memory's cut) the step is half: 3.5 s, c_t = floor(16 * 3 / 3.5) = 13
    assert budget.time_rows(secs, {0: R, 1: J}, 16, 32) == (13, 3.5, 30.0)
    # never below MIN_ROWS, and nothing when the rows are at or under it
    heavy = {0: StepSeconds(jacobian=1e3, reuse=1e3, forward=1.0)}
    assert budget.time_rows(heavy, {0: J}, 32, 32)[0] == budget.MIN_ROWS
    assert budget.time_rows(heavy, {0: J}, budget.MIN_ROWS, 32) is None
    # a block without a price (no roofline): no time rule
    assert budget.time_rows({0: None, **secs}, {0: J, 1: J}, 32, 32) is None
    # a step priced under TIME_FLOOR is left alone whatever its share
    tiny = {0: StepSeconds(jacobian=budget.TIME_FLOOR / 2, reuse=None, forward=1e-9)}
    assert budget.time_rows(tiny, {0: J}, 32, 32) is None


def _expected_rows(opt) -> int:
    """c_t for TokenLinears at M rows, all three Linears on their explicit J (at the 16 MiB floor nothing
    moves): each block priced by ``paths.step_seconds`` with FIXED for its x and gy (a, b on [M, 3, d]
    tokens, head on the mean [M, 20]: what the rule must be handed), the J form's J g and J^T u against
    3 x the forwards."""
    shapes = {"a": ((M, 3, 12), (M, 3, 20)), "b": ((M, 3, 20), (M, 3, 20)), "head": ((M, 20), (M, 3))}
    secs = [paths.step_seconds(b.plan, *shapes[b.name], b.numel, FIXED, 8) for b in opt.blocks]
    step = sum(s.jacobian for s in secs)
    train = 3 * sum(s.forward for s in secs)
    assert step > budget.TIME_SHARE * train
    return max(budget.MIN_ROWS, math.floor(M * budget.TIME_SHARE * train / step))


@pytest.mark.parametrize("k", [1, 2])
def test_rows_cut_for_time_and_each_step_is_exact_for_its_rows(monkeypatch, k):
    monkeypatch.setattr(roofline, "measured", lambda device="cpu": FIXED)
    model = _model()
    opt = TENGraD(model, lr=0.2, damping=0.5, momentum=0.0, kl_clip=None, update_freq=k,
                  generator=torch.Generator().manual_seed(3), prior=None)
    drawn = _run(opt, model, k, 2 * k + 1)
    c = _expected_rows(opt)
    assert 1 < c < M
    assert all(d is not None and len(d) == c for d in drawn), (drawn, c)
    assert not any(b.memory_reuse for b in opt.blocks)           # the floor moved nothing
    assert f"{c} of {M} rows (cut for time: curvature_batch='auto'; {M} rows priced at" in opt.explain()


def test_a_wide_share_or_a_given_batch_keeps_the_rows(monkeypatch):
    monkeypatch.setattr(roofline, "measured", lambda device="cpu": FIXED)
    monkeypatch.setattr(budget, "TIME_SHARE", 100.0)
    model = _model()
    opt = TENGraD(model, lr=0.2, damping=0.5, momentum=0.0, kl_clip=None, update_freq=1, prior=None)
    assert _run(opt, model, 1, 2) == [None, None]
    monkeypatch.setattr(budget, "TIME_SHARE", 0.1)
    model = _model()
    opt = TENGraD(model, lr=0.2, damping=0.5, momentum=0.0, kl_clip=None, update_freq=1, curvature_batch=None, prior=None)
    assert _run(opt, model, 1, 2) == [None, None]                # curvature_batch=None: every row, always
