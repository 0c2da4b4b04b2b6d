"""paths.choose weighs the mat-vecs of an explicit J out of cache (over 2^20 elements) by MATVEC_WEIGHT:
a Linear(648, 500) at m = 128 (J of 41M elements, 166 MB) reused for many steps keeps x/gy (two GEMMs a
step), although its plain flop counts tie; the same layer at m = 2 (J of 648K elements, in cache) and a
conv, whose reuse products are convolutions, keep the explicit J."""
from __future__ import annotations

from torch import nn

import tengrad
from tengrad.optim.curvature import paths


def _choice(module, x_shape, gy_shape, k):
    plan = tengrad.compile(module)
    n = sum(p.numel() for p in module.parameters())
    return paths.choose(plan, x_shape, gy_shape, n, k, 2 ** 30)


def test_out_of_cache_jacobian_mat_vecs_are_weighted():
    lin = nn.Linear(648, 500)
    big = _choice(lin, (128, 648), (128, 500), 10 ** 6)
    assert big.path == paths.REUSE, big.note
    small = _choice(lin, (2, 648), (2, 500), 10 ** 6)     # 2 x 324500 = 649,000 <= 2^20: unweighted
    assert small.path == paths.JACOBIAN, small.note
    conv = _choice(nn.Conv2d(32, 32, 3, padding=1), (128, 32, 28, 28), (128, 32, 28, 28), 10 ** 6)
    assert conv.path == paths.JACOBIAN, conv.note


def test_the_weight_flips_exactly_the_mat_vec_term():
    lin = nn.Linear(648, 500)
    old = paths.MATVEC_WEIGHT
    try:
        paths.MATVEC_WEIGHT = 1       # plain flops: the explicit J's mat-vecs (2 k r P) beat two GEMMs
        assert _choice(lin, (128, 648), (128, 500), 10 ** 6).path == paths.JACOBIAN
    finally:
        paths.MATVEC_WEIGHT = old
