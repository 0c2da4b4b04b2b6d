"""The plan that prints is the plan that runs (torch backend): for every layer case of
``layer_cases``, every quantity and every order, the steps executed are those ``repr(plan)`` shows."""
from __future__ import annotations

import pytest
import torch

import tengrad
from support.layer_cases import CASES, make_setup_input
from support.steps_as_printed import check_layer


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_torch_runs_the_printed_steps(case):
    torch.manual_seed(0)
    mod = case.make_module()
    try:
        plan = tengrad.compile(mod)
    except tengrad.TengradError:
        assert case.allow_error, case.id
        return
    gen = torch.Generator().manual_seed(1)
    x = make_setup_input(case, gen, torch.float32)
    with torch.no_grad():
        gy = torch.randn(mod(x).shape, generator=gen)
    bad = check_layer(plan, x, gy, gen)
    assert not bad, "\n".join(bad)
