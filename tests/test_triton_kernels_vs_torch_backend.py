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
from support.numerics import rel_err
from tengrad.codegen.torch_backend import TermRun
from tengrad_ir import LayerSpec

pytestmark = pytest.mark.interpreter
TOL = 1e-4


def _ids(m, t, num, pad=None):
    def make(gen):
        ids = torch.randint(0, num, (m,) if t is None else (m, t), generator=gen)
        if pad is not None:
            ids.view(-1)[1] = pad % num
        return ids
    return make


# (id, module factory, input shape or id maker)
BATTERY = [
    ("conv1d_stride2_dil2_pad2", lambda: nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=2), (2, 2, 9)),
    ("conv1d_depthwise", lambda: nn.Conv1d(4, 4, 3, groups=4, padding=1), (2, 4, 7)),
    ("conv2d_basic_pad1", lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 3, 6, 5)),
    ("conv2d_stride2_pad1", lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 2, 7, 7)),
    ("conv2d_dil_tuple_pad_tuple", lambda: nn.Conv2d(2, 3, (3, 2), dilation=(1, 2), padding=(1, 2)), (2, 2, 5, 6)),
    ("conv2d_groups2", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (2, 4, 5, 5)),
    ("conv2d_depthwise_stride2", lambda: nn.Conv2d(4, 4, 3, groups=4, stride=2), (2, 4, 7, 7)),
    ("conv2d_chanmult_nobias", lambda: nn.Conv2d(2, 4, (2, 3), groups=2, bias=False), (2, 2, 5, 5)),
    ("conv2d_same_evenk", lambda: nn.Conv2d(2, 3, 4, padding="same"), (2, 2, 5, 6)),
    ("conv2d_wide_17x18", lambda: nn.Conv2d(17, 18, 3, padding=1), (2, 17, 4, 3)),
    ("conv3d_stride2_pad1", lambda: nn.Conv3d(2, 2, 3, stride=2, padding=1), (2, 2, 5, 4, 5)),
    ("conv3d_depthwise", lambda: nn.Conv3d(2, 2, 2, groups=2, padding=1), (2, 2, 2, 3, 2)),
    ("linear_2d", lambda: nn.Linear(37, 19), (2, 37)),
    ("linear_3d", lambda: nn.Linear(4, 3), (2, 5, 4)),
    ("linear_4d_nobias", lambda: nn.Linear(3, 4, bias=False), (2, 2, 3, 3)),
    ("layernorm_1dim", lambda: nn.LayerNorm(5), (2, 3, 5)),
    ("layernorm_2dim", lambda: nn.LayerNorm((2, 3)), (2, 2, 2, 3)),
    ("embedding_2d_ids", lambda: nn.Embedding(6, 4), _ids(2, 5, 6)),
    ("embedding_padding_idx", lambda: nn.Embedding(5, 3, padding_idx=2), _ids(3, 4, 5, pad=2)),
    ("embedding_1d_ids", lambda: nn.Embedding(5, 3), _ids(4, None, 5)),
    # the norms: all channel norms share one spec pair (n c *s, c -> n c *s and the ones-bias), so one
    # BatchNorm per form of *s and a GroupNorm stand for them; RMSNorm shares LayerNorm's
    ("batchnorm1d_2d", lambda: nn.BatchNorm1d(3), (4, 3)),
    ("batchnorm2d_eval", lambda: nn.BatchNorm2d(3).eval(), (2, 3, 4, 5)),
    ("groupnorm_2d", lambda: nn.GroupNorm(2, 4), (2, 4, 3, 3)),
    ("rmsnorm_2dim", lambda: nn.RMSNorm((2, 3)), (2, 4, 2, 3)),
]


def term_runs(make, shape, seed=0):
    """The torch backend's TermRuns of a module on random float32 data (the plan's own binding)."""
    torch.manual_seed(seed)
    mod = make()
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_()
    gen = torch.Generator().manual_seed(seed + 1)
    x = shape(gen) if callable(shape) else torch.randn(shape, generator=gen)
    gy = torch.randn(mod(x).shape, generator=gen)
    plan = tengrad.compile(mod)
    return plan, x, gy, plan._runs(x, gy)[1]


def check_run(ref: TermRun, orders_gram=("direct", "factored")) -> list[str]:
    """Every kernel kind of TritonTermRun against the reference; returns failure strings."""
    t = TritonTermRun(ref.spec, ref.sizes, ref.x, ref.g)
    gen = torch.Generator().manual_seed(3)
    j_ref = ref.jacobian()
    p = torch.randn(j_ref.shape[1:], generator=gen)
    u = torch.randn(ref.m, generator=gen)
    want = {"jacobian": j_ref, "gram": ref.gram("direct"), "jvp": ref.jvp(p, "direct"), "vjp": ref.vjp(u, "direct")}
    got = {("jacobian", ""): t.jacobian()}
    for o in orders_gram:
        got[("gram", o)] = t.gram(o)
    for o in ("direct", "forward"):
        got[("jvp", o)] = t.jvp(p, o)
    for o in ("direct", "weight_grad"):
        got[("vjp", o)] = t.vjp(u, o)
    bad = []
    for (q, o), val in got.items():
        if val.shape != want[q].shape or val.dtype != want[q].dtype:
            bad.append(f"{ref.spec.name} {q} {o}: shape/dtype {tuple(val.shape)} {val.dtype} vs "
                       f"{tuple(want[q].shape)} {want[q].dtype}")
        elif rel_err(val, want[q]) > TOL:
            bad.append(f"{ref.spec.name} {q} {o}: rel err {rel_err(val, want[q]):.2e}")
    return bad


@pytest.mark.parametrize("case", BATTERY, ids=[c[0] for c in BATTERY])
def test_kernels_match_torch_backend(case):
    _, make, shape = case
    _, _, _, runs = term_runs(make, shape)
    bad = []
    for ref, _ in runs:
        bad += check_run(ref)
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
