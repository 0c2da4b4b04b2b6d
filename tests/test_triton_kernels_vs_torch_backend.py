"""Generated Triton kernels vs the torch backend's ``TermRun`` (the reference), under the interpreter.

For every layer configuration of the battery and every term of its plan, ``TritonTermRun`` must
reproduce in float32 (rel err <= 1e-4) all four kernel kinds:

    jacobian()                      J (implicit-unfold GEMM)
    gram("direct"), gram("factored")   (factored_raw has no kernel: a triton plan never chooses it)
    jvp(p, "direct"), jvp(p, "forward")
    vjp(u, "direct"), vjp(u, "weight_grad")

Sizes are tiny and deliberately not multiples of the block sizes (16/32). A user-declared spec
(token mixing ``n s d, t s -> n t d``) and the end-to-end path (``tengrad.compile`` with
``backend="triton"``) are covered too.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

try:
    import triton  # noqa: F401
    from tengrad.codegen.triton import TritonTermRun
except Exception as exc:  # noqa: BLE001
    print(f"skipping triton kernel tests: triton cannot be imported ({exc!r})")
    pytest.skip(f"triton cannot be imported: {exc!r}", allow_module_level=True)

import tengrad
from support import background
from support.numerics import rel_err
from support.triton_cases import BATTERY_IDS, TOL, check_run, term_runs
from tengrad.codegen.torch_backend import TermRun
from tengrad_ir import LayerSpec

pytestmark = pytest.mark.interpreter


@pytest.mark.background("triton_battery")
@pytest.mark.parametrize("case_id", BATTERY_IDS)
def test_kernels_match_torch_backend(case_id):
    """Every term of the case's plan: the seven kernel results against the torch backend (check_run), run by
    the "triton_battery" job in its own process under the interpreter (support/triton_cases.py)."""
    job = background.get("triton_battery").result()
    assert job.returncode == 0 and job.failures is not None, job.out
    bad = job.failures[case_id]
    assert not bad, "\n".join(bad)


def test_triton_never_plans_factored_raw():
    """The triton backend has no kernel for the raw covariance: its plan neither lists nor chooses
    factored_raw (sizes where the torch plan does choose it), and asking for it is refused by name."""
    mod = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    x, gy = torch.randn(8, 16, 3, 3), torch.randn(8, 16, 3, 3)
    torch_plan = tengrad.compile(mod).sized(x.shape, gy.shape)
    assert torch_plan.choice["gram"] == "factored_raw"
    plan = tengrad.compile(mod, backend="triton")
    sized = plan.sized(x.shape, gy.shape)
    assert sized.choice["gram"] != "factored_raw" and "factored_raw" not in plan.orders("gram")
    assert "the triton backend has no step contract -> R, raw_cov_unfold -> C1" in repr(sized)
    with pytest.raises(tengrad.TengradError, match=r"'factored_raw'.*valid: \['direct', 'factored'\]"):
        plan.gram(x, gy, order="factored_raw")


def test_user_declared_token_mixing_spec():
    """``n s d, t s -> n t d``: s independent, t free, d common (a token-mixing MLP layer)."""
    spec = LayerSpec.parse("n s d, t s -> n t d", name="TokenMix.weight",
                           roles={"s": "independent", "t": "free", "d": "common"})
    sizes = {"n": 3, "s": 7, "t": 5, "d": 19}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 19, generator=gen)
    g = torch.randn(3, 5, 19, generator=gen)
    bad = check_run(TermRun(spec, sizes, x, g))
    assert not bad, "\n".join(bad)


def test_end_to_end_through_compile():
    """``tengrad.compile(backend="triton")`` under the interpreter: every order of every quantity."""
    mod = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    torch.manual_seed(0)
    x = torch.randn(3, 2, 6, 5)
    gy = torch.randn(mod(x).shape)
    ref = tengrad.compile(mod)
    plan = tengrad.compile(mod, backend="triton")
    p = [torch.randn_like(q) for _, q in plan.params]
    u = torch.randn(3)
    k_ref = ref.gram(x, gy, order="direct")
    for order in plan.orders("gram"):
        assert rel_err(plan.gram(x, gy, order=order), k_ref) <= TOL, order
    for order in plan.orders("jvp"):
        assert rel_err(plan.jvp(x, gy, p, order=order), ref.jvp(x, gy, p, order="direct")) <= TOL, order
    for order in plan.orders("vjp"):
        for a, b in zip(plan.vjp(x, gy, u, order=order), ref.vjp(x, gy, u, order="direct")):
            assert rel_err(a, b) <= TOL, order
    for a, b in zip(plan.jacobian(x, gy), ref.jacobian(x, gy)):
        assert rel_err(a, b) <= TOL


def test_float64_accumulates_in_float64():
    _, _, _, runs = term_runs(lambda: nn.Linear(5, 3), (3, 4, 5))
    ref, _ = runs[0]
    ref64 = TermRun(ref.spec, ref.sizes, ref.x.double(), ref.g.double())
    t = TritonTermRun(ref64.spec, ref64.sizes, ref64.x, ref64.g)
    assert "tl.float64" in t.source()
    k = t.gram("factored")
    assert k.dtype == torch.float64
    assert rel_err(k, ref64.gram("direct")) <= 1e-10


def test_direct_orders_with_several_sample_tiles():
    """m = 37 spans three 16-row tiles: the symmetric (upper-tile) J J^T and the J p / J^T u GEMMs."""
    _, _, _, runs = term_runs(lambda: nn.Linear(5, 3, bias=False), (37, 5))
    ref, _ = runs[0]
    t = TritonTermRun(ref.spec, ref.sizes, ref.x, ref.g)
    p, u = torch.randn(3, 5), torch.randn(37)
    assert rel_err(t.gram("direct"), ref.gram("direct")) <= TOL
    assert rel_err(t.jvp(p, "direct"), ref.jvp(p, "direct")) <= TOL
    assert rel_err(t.vjp(u, "direct"), ref.vjp(u, "direct")) <= TOL
    assert rel_err(t.vjp(u, "weight_grad"), ref.vjp(u, "direct")) <= TOL
