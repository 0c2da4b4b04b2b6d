"""All blocks solved together (curvature/batched.py) give the per-block solve's step.

1. ``factor_all`` and ``Solver`` against woodbury.factor / woodbury.solve block by block, on random
   Gram matrices of mixed row counts and dtypes with per-block dampings, one block whose first
   factorisation fails (10x retry, for that block only) and a kept stack reused with new right-hand sides.
2. A model with a float64 layer and float32 layers of different widths, in param groups with different
   dampings, stepped (update_freq 2, a damping change on the reuse step) against the dense float64
   oracle (F_b + a_b I)^-1 g_b.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.numerics import rel_err
from support.step_oracle import dense_directions, oracle_fisher, per_sample_grads
from tengrad.optim import TENGraD, TENGraDError
from tengrad.optim.curvature import batched, woodbury


def random_gram(r: int, p: int, dtype, gen) -> torch.Tensor:
    j = torch.randn(r, p, generator=gen, dtype=torch.float64).to(dtype)
    return j @ j.T


def test_batched_factor_and_solve_equal_the_per_block_ones():
    gen = torch.Generator().manual_seed(0)
    spec = [(6, 9, torch.float32, 0.5), (6, 4, torch.float32, 2.0), (4, 7, torch.float64, 0.5),
            (6, 5, torch.float32, 0.5), (4, 3, torch.float64, 0.1), (3, 8, torch.float32, 1.0)]
    grams = [random_gram(r, p, dt, gen) for r, p, dt, _ in spec]
    # block 3: indefinite, K + m a I fails at a and succeeds at 10 a (eigenvalues of K - 5 m a I ...)
    m3, a3 = 6, 0.5
    grams[3] = grams[3] - (grams[3].diagonal().max() + 2.0 * m3 * a3) * torch.eye(6)
    shift = torch.linalg.eigvalsh(grams[3].double()).min()
    grams[3] = grams[3] + (-shift - 3.0 * m3 * a3)      # smallest eigenvalue -3 m a: fails at a, not at 10 a
    ms = [r for r, *_ in spec]
    damp = [a for *_, a in spec]
    names = [f"b{i}" for i in range(len(spec))]
    got = batched.factor_all(grams, ms, damp, names)
    solver = batched.Solver()
    for round_ in range(2):                              # round 1: the kept stacks, new right-hand sides
        rgs = [torch.randn(g.shape[0], generator=gen, dtype=torch.float64).to(g.dtype) for g in grams]
        scales = [-1.0 / a for _, a in got]
        us = solver.solve([c for c, _ in got], rgs, scales)
        for i, (gram, m, a) in enumerate(zip(grams, ms, damp)):
            chol, used = woodbury.factor(gram, m, a, names[i])
            assert used == got[i][1], (i, used, got[i][1])
            assert got[i][0].dtype == gram.dtype and us[i].dtype == gram.dtype
            tol = 1e-12 if gram.dtype == torch.float64 else 1e-5
            assert rel_err(got[i][0], chol) < tol, i
            want = woodbury.solve(chol, rgs[i]) * (-1.0 / used)
            # and against a dense solve in float64
            dense = torch.linalg.solve(gram.double() + m * used * torch.eye(m, dtype=torch.float64),
                                       rgs[i].double()) * (-1.0 / used)
            assert rel_err(us[i], want) < tol and rel_err(us[i], dense) < 1e-4, (round_, i)
    assert got[3][1] == 10 * a3 and got[0][1] == 0.5    # only the failing block was redamped


def test_batched_factor_names_the_failing_block():
    gen = torch.Generator().manual_seed(1)
    good = random_gram(5, 6, torch.float32, gen)
    bad = -100.0 * torch.eye(5)                          # fails at a and at 10 a
    with pytest.raises(TENGraDError, match=r"layer 'second'.*failed even with 10x damping"):
        batched.factor_all([good, bad], [5, 5], [0.1, 0.1], ["first", "second"])
    nan = good.clone()
    nan[1, 2] = float("nan")
    with pytest.raises(TENGraDError, match=r"layer 'nan'.*non-finite"):
        batched.factor_all([good, nan], [5, 5], [0.1, 0.1], ["ok", "nan"])


class Cast(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return x.to(self.dtype)


def mixed_model() -> nn.Module:
    torch.manual_seed(4)
    first = nn.Linear(5, 7).double()                     # a float64 block beside float32 ones
    return nn.Sequential(first, nn.Tanh(), Cast(torch.float32), nn.Linear(7, 6), nn.Tanh(),
                         nn.Linear(6, 3, bias=False))


def test_mixed_dtypes_and_dampings_step_equals_the_dense_oracle():
    model = mixed_model()
    groups = [{"params": model[0].parameters(), "damping": 0.3},
              {"params": model[3].parameters(), "damping": 1.5}]
    opt = TENGraD(model, 0.2, 0.5, momentum=0.0, update_freq=2, kl_clip=None, param_groups=groups, prior=None)
    gen = torch.Generator().manual_seed(5)
    F_stored = names = None
    for s, m in enumerate([6, 5, 6]):
        if s == 1:                                       # reuse step: two blocks refactored together
            opt.param_groups[0]["damping"] = 0.8
            opt.param_groups[2]["damping"] = 0.05
        x = torch.randn(m, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (m,), generator=gen)
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        twin64 = _twin(model)
        if s % 2 == 0:
            F_stored, names = oracle_fisher(twin64, x, y, "empirical", "cross_entropy")
        g = {n: t.mean(0) for n, t in per_sample_grads(twin64, x, y, "cross_entropy").items()}
        damping = {n: opt.param_groups[gi]["damping"] for gi, grp in enumerate(opt.param_groups)
                   for n, p in model.named_parameters() if any(p is q for q in grp["params"])}
        d = dense_directions(F_stored, names, {n: t.shape for n, t in theta.items()}, g,
                             [b.param_names for b in opt.blocks if b.param_names], damping)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for n, p in model.named_parameters():
            # the float64 block's output gradients come back through float32 layers: float32-accurate
            tol = 1e-6 if p.dtype == torch.float64 else 2e-5
            err = rel_err(p.detach() - theta[n], -opt.param_groups[_group(opt, p)]["lr"] * d[n])
            assert err < tol, (s, n, err)
    assert {b.curv.chol.dtype for b in opt.blocks} == {torch.float32, torch.float64}


def _group(opt, p) -> int:
    return next(i for i, g in enumerate(opt.param_groups) if any(p is q for q in g["params"]))


def _twin(model):
    import copy
    twin = copy.deepcopy(model).double()
    twin[2].dtype = torch.float64
    return twin
