"""The norm layers' specs through the generated Triton kernels (interpreter on CPU), against the
torch backend, like the battery of test_triton_kernels.py. All channel norms share one spec pair
(``n c *s, c -> n c *s`` and the ones-bias), so one BatchNorm per form of ``*s`` and a GroupNorm stand
for them; RMSNorm shares LayerNorm's."""
from __future__ import annotations

import pytest
from torch import nn

from test_triton_kernels import check_run, term_runs  # sets TRITON_INTERPRET=1 first; skips without triton

pytestmark = pytest.mark.interpreter

BATTERY = [
    ("batchnorm1d_2d", lambda: nn.BatchNorm1d(3), (4, 3)),
    ("batchnorm2d_eval", lambda: nn.BatchNorm2d(3).eval(), (2, 3, 4, 5)),
    ("groupnorm_2d", lambda: nn.GroupNorm(2, 4), (2, 4, 3, 3)),
    ("rmsnorm_2dim", lambda: nn.RMSNorm((2, 3)), (2, 4, 2, 3)),
]


@pytest.mark.parametrize("case", BATTERY, ids=[c[0] for c in BATTERY])
def test_norm_kernels_match_torch_backend(case):
    _, make, shape = case
    _, _, _, runs = term_runs(make, shape)
    bad = []
    for ref, _ in runs:
        bad += check_run(ref)
    assert not bad, "\n".join(bad)
