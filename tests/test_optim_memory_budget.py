"""The default memory budget (issue 23; curvature/budget.py): ``curvature_memory="auto"`` moves explicit
J's to x and gy and ``curvature_batch="auto"`` samples rows until the kept curvature is within
B = max(FLOOR, SHARE * T), T = parameters + gradients + captured layer inputs.

Oracle (support/step_oracle.py, float64, seeded inputs): per-sample gradients; the Fisher of the rows the
optimizer drew (``opt.last_curvature_rows``, or every row), the mean gradient of the whole batch;
change = -lr (F_b + a I)^-1 g_b per block, on curvature and reuse steps. FLOOR is monkeypatched to 0 so
the budget binds on a small model (at the real 16 MiB floor small models are left exact:
``test_small_models_keep_every_row_and_their_forms_by_default``).
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from support.numerics import rel_err
from support.optim_cases import TokenLinears
from support.step_oracle import expected_steps, fisher_from_grads, model_at, per_sample_grads
from tengrad.optim import TENGraD
from tengrad.optim.curvature import budget, memory, paths


M = 32      # the batch: the budget (which grows with m) leaves a few rows of it


def _model():
    torch.manual_seed(0)
    return TokenLinears().double()


def _batch(seed, m=M):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, 3, 12, generator=gen, dtype=torch.float64), torch.randint(0, 3, (m,), generator=gen)


def _run(opt, model, k, steps, lr=0.2, damping=0.5):
    """``steps`` steps against the oracle; returns the rows drawn per curvature step (None: all)."""
    F_kept, drawn = None, []
    names = [n for n, _ in model.named_parameters()]
    for s in range(steps):
        x, y = _batch(s)
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        rows = per_sample_grads(model, x, y, "cross_entropy")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if s % k == 0:
            got = opt.last_curvature_rows
            idx = got[x.shape[0]] if got is not None else torch.arange(x.shape[0])
            drawn.append(None if got is None else idx.tolist())
            sub = per_sample_grads(model_at(model, theta), x[idx], y[idx], "cross_entropy")
            F_kept = fisher_from_grads(sub, names)
        want = expected_steps(opt, model_at(model, theta), F_kept, names, {n: t.mean(0) for n, t in rows.items()},
                              lr, damping)
        for n, p in model.named_parameters():
            assert rel_err(p.detach() - theta[n], want[n]) <= 1e-8, (s, n)
    return drawn


def _budget(model, m=M):
    """SHARE * T - D: T = gradients (momentum 0: no buffers) + the three Linears' inputs (head's: [m, 20]),
    D = the direction, float64."""
    params = sum(p.numel() for p in model.parameters()) * 8
    return int(budget.SHARE * (params + m * (3 * 12 + 3 * 20 + 20) * 8)) - params


@pytest.mark.parametrize("k", [1, 2])
def test_the_auto_budget_moves_forms_then_samples_rows_and_each_step_is_exact_for_its_rows(k, monkeypatch):
    monkeypatch.setattr(budget, "FLOOR", 0)
    model = _model()
    opt = TENGraD(model, lr=0.2, damping=0.5, momentum=0.0, kl_clip=None, update_freq=k,
                  generator=torch.Generator().manual_seed(3), prior=None)
    drawn = _run(opt, model, k, 2 * k + 1)
    cap = _budget(model)
    assert all(b.memory_reuse for b in opt.blocks if b.name in ("a", "b"))    # their J's moved first
    kept = sum(memory.kept_bytes(b.curv.rows) for b in opt.blocks)
    full_xgy = sum(M * 8 * 3 * (i + o) for i, o in ((12, 20), (20, 20)))       # a, b: x and gy, M rows
    head = M * 8 * (20 + 3)                                                      # head: x and gy (< its J)
    assert full_xgy + head > cap                                                 # so the rows were cut
    c = (M * cap) // (full_xgy + head)
    assert 2 <= c < M
    assert all(d is not None and len(d) == c for d in drawn), (drawn, c)
    assert kept <= cap and all(b.curv.m == c for b in opt.blocks)
    assert len({tuple(d) for d in drawn}) > 1                                    # fresh draws
    assert all("curvature_memory" in b.choice.note for b in opt.blocks if b.memory_reuse)


def test_with_curvature_batch_none_the_budget_moves_forms_only_and_the_step_is_the_whole_batch(monkeypatch):
    monkeypatch.setattr(budget, "FLOOR", 0)
    model = _model()
    opt = TENGraD(model, lr=0.2, damping=0.5, momentum=0.0, kl_clip=None, update_freq=2, curvature_batch=None, prior=None)
    drawn = _run(opt, model, 2, 4)
    assert drawn == [None, None]
    moved = [b for b in opt.blocks if b.memory_reuse]
    assert moved and all(b.curv.path == paths.REUSE and b.curv.m == M for b in moved)


def test_small_models_keep_every_row_and_their_forms_by_default():
    """At the real floor (16 MiB) nothing of a small model is moved or sampled: the whole batch's step."""
    model = _model()
    opt = TENGraD(model, lr=0.2, damping=0.5, momentum=0.0, kl_clip=None, update_freq=1, prior=None)
    assert (opt.curvature_batch, opt.curvature_memory) == ("auto", "auto")
    assert _run(opt, model, 1, 2) == [None, None]
    assert not any(b.memory_reuse for b in opt.blocks) and any(b.curv.rows.explicit_held for b in opt.blocks)


def test_fit_moves_the_largest_saving_first_then_cuts_rows():
    J, R = paths.JACOBIAN, paths.REUSE
    forms = {0: (J, 100, 10, 8), 1: (J, 50, 40, 8), 2: (R, 999, 20, 8)}
    assert budget.fit(forms, 1000, None) == ([], None, 170)
    assert budget.fit(forms, 100, None) == ([0], None, 80)
    assert budget.fit(forms, 70, None) == ([0, 1], None, 70)
    moved, c, kept = budget.fit(forms, 35, "auto")              # 70 bytes at 8 rows: 4 rows fit 35
    assert (moved, c, kept) == ([0, 1], 4, 35)
    assert budget.fit(forms, 40, 4) == ([0], None, 40)          # a given batch: bytes of its 4 rows
    assert budget.fit(forms, 0, "auto")[1] == 1                 # at least one row


def test_explain_names_the_budget_and_the_rows(monkeypatch):
    monkeypatch.setattr(budget, "FLOOR", 0)
    model = _model()
    opt = TENGraD(model, lr=0.2, damping=0.5, momentum=0.0, kl_clip=None, update_freq=1, prior=None)
    _run(opt, model, 1, 1)
    c = len(opt.last_curvature_rows[M])
    assert f"{c} of {M} rows (cut to fit: curvature_batch='auto')" in opt.explain()
    assert "memory budget" in opt.explain() and "2 block(s) on x and gy" in opt.explain()


@pytest.mark.parametrize("cap", [2 ** 17, 2 ** 19], ids=["128 KiB", "512 KiB"])
def test_the_defaults_prior_keeps_its_explicit_rows_within_the_budget(cap):
    """The defaults' prior (prior="soap") keeps a rotatable block's rows as an explicit rotated J whatever
    form the plain rows would take: the budget prices that J, and a block it moves to x and gy takes
    the identity prior (named in explain()); the kept curvature stays within curvature_memory (the
    rows' x and gy or J, K and the factor left out as in budget.py)."""
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3)).double()
    opt = TENGraD(model, curvature_memory=cap, curvature_batch=None)
    gen = torch.Generator().manual_seed(2)
    for _ in range(12):                 # past the first curvature step: the eigenbasis exists from step 1
        x, y = torch.randn(64, 24, generator=gen, dtype=torch.float64), torch.randint(0, 3, (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    kept = sum(memory.kept_bytes(b.curv.rows) for b in opt.blocks)
    assert kept <= cap, (kept, cap)
    moved = [b for b in opt.blocks if b.memory_reuse]
    explicit = [b for b in opt.blocks if b.curv.rows.explicit_held]
    assert moved and all(b.curv.rows.prior is None and "memory budget" in b.curv.rows.prior_note for b in moved)
    assert explicit and all(b.curv.rows.prior is not None for b in explicit)   # the others keep SOAP's D
    assert "moved to x and gy by the memory budget" in opt.explain()
