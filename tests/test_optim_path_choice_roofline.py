"""paths.choose with a roofline (curvature/roofline.py) prices a J out of cache by the bytes its
mat-vecs read: a 64-channel 3x3 conv on 8x8 maps at m = 128 (J 128 x 36,928, 19 MB) keeps x/gy at
1 GB/s and its explicit J at 10 GB/s (matmul rate 100 GFLOP/s both); a J in cache is priced by flops
as without a roofline. The measured rates are positive and cached per device type."""
from __future__ import annotations

from torch import nn

import tengrad
from tengrad.optim.curvature import paths, roofline


def _choice(module, x_shape, gy_shape, k, line):
    n = sum(p.numel() for p in module.parameters())
    return paths.choose(tengrad.compile(module), x_shape, gy_shape, n, k, 2 ** 30, line)


def test_bandwidth_decides_an_out_of_cache_jacobian():
    conv = nn.Conv2d(64, 64, 3, padding=1)
    slow = roofline.Roofline(flops_per_s=1e11, bytes_per_s=1e9)
    fast = roofline.Roofline(flops_per_s=1e11, bytes_per_s=1e10)
    assert _choice(conv, (128, 64, 8, 8), (128, 64, 8, 8), 10, slow).path == paths.REUSE
    choice = _choice(conv, (128, 64, 8, 8), (128, 64, 8, 8), 10, fast)
    assert choice.path == paths.JACOBIAN and "roofline" in choice.note
    lin = nn.Linear(648, 500)
    small = _choice(lin, (2, 648), (2, 500), 10, slow)            # in cache: flops, as without a roofline
    assert small.path == _choice(lin, (2, 648), (2, 500), 10, None).path and "roofline" not in small.note


def test_measured_rates_are_cached():
    a = roofline.measured("cpu")
    assert a.flops_per_s > 0 and a.bytes_per_s > 0
    assert roofline.measured("cpu") is a
