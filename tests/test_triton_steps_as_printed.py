"""The plan that prints is the plan that runs (triton backend, under TRITON_INTERPRET=1): on a few
small layers of each operand kind, the steps the generated kernels ran are those ``repr(plan)``
shows for the triton backend (fused steps included: they are recorded by the kernel that covers
them)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

try:
    import triton  # noqa: F401
except Exception as exc:  # noqa: BLE001
    print(f"skipping triton step tests: triton cannot be imported ({exc!r})")
    pytest.skip(f"triton cannot be imported: {exc!r}", allow_module_level=True)

import tengrad
from support.steps_as_printed import check_layer

pytestmark = pytest.mark.interpreter

CASES = [
    ("conv2d_stride2_pad1", lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), lambda g: torch.randn(2, 2, 5, 5, generator=g)),
    ("linear_seq", lambda: nn.Linear(4, 3), lambda g: torch.randn(2, 3, 4, generator=g)),
    ("layernorm", lambda: nn.LayerNorm(4), lambda g: torch.randn(2, 3, 4, generator=g)),
    ("embedding_pad", lambda: nn.Embedding(5, 3, padding_idx=1), lambda g: torch.randint(0, 5, (3, 4), generator=g)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_runs_the_printed_steps(case):
    _, make, make_x = case
    torch.manual_seed(0)
    mod = make()
    gen = torch.Generator().manual_seed(1)
    x = make_x(gen)
    with torch.no_grad():
        gy = torch.randn(mod(x).shape, generator=gen)
    plan = tengrad.compile(mod, backend="triton")
    assert plan.backend_for(gy).name == "triton"
    bad = check_layer(plan, x, gy, gen)
    assert not bad, "\n".join(bad)
