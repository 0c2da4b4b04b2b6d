"""Every layer case x dtype x quantity x evaluation order against the torch.func oracle.

For each case of ``layer_cases.CASES`` and each of float64 / float32, ``tengrad.compile(module)``
must reproduce, for EVERY order in ``plan.orders(q)`` and for ``order=None``:

    plan.gram(x, gy)      == J J^T
    plan.jvp(x, gy, p)    == J @ cat(p)
    plan.vjp(x, gy, u)    == J^T u   (split into parameter shapes)
    plan.jacobian(x, gy)  == J       (split per parameter, [m, *shape])

with J the float64 oracle for the very same (upcast) values; rel err <= 1e-10 (float64),
<= 1e-4 (float32). Cases marked ``allow_error`` may instead raise ``tengrad.TengradError``.
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import tengrad
from support.layer_cases import CASES, Case, make_setup_input
from support.jacobian_oracle import (
    as_oracle_module,
    compare_plan,
    per_sample_jacobian,
    trainable_params,
)

BY_ID = {c.id: c for c in CASES}
DTYPES = {"f64": torch.float64, "f32": torch.float32}
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
QUANTITIES = ("gram", "jvp", "vjp", "jacobian")


@dataclass
class Setup:
    case: Case
    module: nn.Module
    x: torch.Tensor
    gy: torch.Tensor
    p: list[torch.Tensor]
    u: torch.Tensor
    J: torch.Tensor  # float64 oracle for exactly these values


def _seed(case_id: str) -> int:
    return zlib.crc32(case_id.encode())


@functools.lru_cache(maxsize=None)
def _module64(case_id: str) -> nn.Module:
    case = BY_ID[case_id]
    torch.manual_seed(_seed(case_id))
    mod = case.make_module().double()
    gen = torch.Generator().manual_seed(_seed(case_id) + 7)
    with torch.no_grad():  # random (non-default) parameter values: LayerNorm starts at 1 / 0
        for prm in mod.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen, dtype=prm.dtype))
    return mod


@functools.lru_cache(maxsize=None)
def make_setup(case_id: str, dtype_name: str) -> Setup:
    case = BY_ID[case_id]
    dtype = DTYPES[dtype_name]
    mod64 = _module64(case_id)
    mod = mod64 if dtype == torch.float64 else as_oracle_module(mod64, dtype)
    gen = torch.Generator().manual_seed(_seed(case_id) + 1)
    x = make_setup_input(case, gen, torch.float64)
    with torch.no_grad():
        y = mod64(x)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    params = trainable_params(mod)
    p = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype) for _, t in params]
    u = torch.randn(x.shape[0], generator=gen, dtype=torch.float64).to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    gy = gy.to(dtype)
    if case.oracle_view is not None:   # samples coupled by batch statistics: x_hat held fixed
        J = per_sample_jacobian(*case.oracle_view(mod, x), gy)
    else:
        J = per_sample_jacobian(mod, x, gy)  # float64 on exact upcasts
    return Setup(case, mod, x, gy, p, u, J)


@functools.lru_cache(maxsize=None)
def compiled(case_id: str, dtype_name: str):
    """(plan, None) or (None, TengradError) for an allow_error case that the library refuses."""
    s = make_setup(case_id, dtype_name)
    try:
        return tengrad.compile(s.module), None
    except tengrad.TengradError as exc:
        if s.case.allow_error:
            return None, exc
        raise


def _fmt(case_id, dtype_name, failures):
    return f"{case_id} [{dtype_name}] failed:\n  " + "\n  ".join(failures)


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_layer_against_oracle(case_id, dtype_name, quantity):
    s = make_setup(case_id, dtype_name)
    plan, refused = compiled(case_id, dtype_name)
    if refused is not None:
        return  # allowed: the library refuses this configuration with a TengradError
    accept = (tengrad.TengradError,) if s.case.allow_error else ()
    failures = compare_plan(plan, s.module, s.x, s.gy, s.J, s.p, s.u, TOL[s.gy.dtype],
                            quantities=(quantity,), accept=accept)
    assert not failures, _fmt(case_id, dtype_name, failures)


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_plan_params(case_id):
    s = make_setup(case_id, "f64")
    plan, refused = compiled(case_id, "f64")
    if refused is not None:
        return
    assert plan.module is s.module
    want = trainable_params(s.module)
    got = list(plan.params)
    assert [n for n, _ in got] == [n for n, _ in want]
    assert all(a is b for (_, a), (_, b) in zip(got, want))
    for q in ("gram", "jvp", "vjp"):
        orders = list(plan.orders(q))
        assert orders and all(isinstance(o, str) for o in orders)
        assert len(set(orders)) == len(orders)


# ------------------------------------------------------------------------------ errors

ERROR_CASES = [
    "linear_2d",
    "linear_3d",
    "linear_4d_nobias",
    "conv1d_basic",
    "conv2d_groups2",
    "conv3d_basic",
    "layernorm_2dim",
    "embedding_padding_idx",
]


def _bad_x(s: Setup) -> torch.Tensor:
    """An input whose shape the layer cannot accept (or that does not match gy)."""
    x = s.x
    name = type(s.module).__name__
    if name.startswith("Conv"):  # one channel too many
        return torch.cat([x, x[:, :1]], dim=1)
    if name in ("Linear", "LayerNorm"):  # feature dim one too large
        return torch.cat([x, x[..., :1]], dim=-1)
    return torch.cat([x, x[:1]], dim=0)  # Embedding: ids for one more sample than gy has


def _bad_gy(s: Setup) -> torch.Tensor:
    return torch.cat([s.gy, s.gy[..., :1]], dim=-1)


def _calls(plan, s: Setup, x=None, gy=None, p=None, u=None):
    x = s.x if x is None else x
    gy = s.gy if gy is None else gy
    p = s.p if p is None else p
    u = s.u if u is None else u
    return {
        "gram": lambda: plan.gram(x, gy),
        "jvp": lambda: plan.jvp(x, gy, p),
        "vjp": lambda: plan.vjp(x, gy, u),
        "jacobian": lambda: plan.jacobian(x, gy),
    }


def _expect_error(fn, module, what):
    name = type(module).__name__
    with pytest.raises(tengrad.TengradError) as info:
        fn()
    assert name in str(info.value), f"{what}: message does not name {name}: {info.value}"


@pytest.mark.parametrize("case_id", ERROR_CASES)
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_wrong_x_shape(case_id, quantity):
    s = make_setup(case_id, "f64")
    plan, _ = compiled(case_id, "f64")
    _expect_error(_calls(plan, s, x=_bad_x(s))[quantity], s.module, f"bad x for {quantity}")


@pytest.mark.parametrize("case_id", ERROR_CASES)
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_wrong_gy_shape(case_id, quantity):
    s = make_setup(case_id, "f64")
    plan, _ = compiled(case_id, "f64")
    _expect_error(_calls(plan, s, gy=_bad_gy(s))[quantity], s.module, f"bad gy for {quantity}")


@pytest.mark.parametrize("case_id", ERROR_CASES)
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_gy_batch_mismatch(case_id, quantity):
    s = make_setup(case_id, "f64")
    plan, _ = compiled(case_id, "f64")
    gy = torch.cat([s.gy, s.gy[:1]], dim=0)
    _expect_error(_calls(plan, s, gy=gy)[quantity], s.module, f"gy batch m+1 for {quantity}")


@pytest.mark.parametrize("case_id", ERROR_CASES)
@pytest.mark.parametrize("kind", ["too_few", "too_many", "bad_shape"])
def test_wrong_p(case_id, kind):
    s = make_setup(case_id, "f64")
    plan, _ = compiled(case_id, "f64")
    if kind == "too_few":
        p = s.p[:-1]
    elif kind == "too_many":
        p = [*s.p, s.p[-1]]
    else:
        p = [torch.cat([s.p[0], s.p[0][:1]], dim=0), *s.p[1:]]
    _expect_error(lambda: plan.jvp(s.x, s.gy, p), s.module, f"p {kind}")


@pytest.mark.parametrize("case_id", ERROR_CASES)
def test_wrong_u_shape(case_id):
    s = make_setup(case_id, "f64")
    plan, _ = compiled(case_id, "f64")
    u = torch.cat([s.u, s.u[:1]])
    _expect_error(lambda: plan.vjp(s.x, s.gy, u), s.module, "u of length m+1")


@pytest.mark.parametrize("case_id", ERROR_CASES)
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_wrong_dtype_integer_gy(case_id, quantity):
    s = make_setup(case_id, "f64")
    plan, _ = compiled(case_id, "f64")
    gy = torch.randint(1, 5, s.gy.shape)
    _expect_error(_calls(plan, s, gy=gy)[quantity], s.module, f"integer gy for {quantity}")


@pytest.mark.parametrize("quantity", QUANTITIES)
def test_wrong_dtype_float_ids_for_embedding(quantity):
    s = make_setup("embedding_2d_ids", "f64")
    plan, _ = compiled("embedding_2d_ids", "f64")
    x = s.x.to(torch.float64)
    _expect_error(_calls(plan, s, x=x)[quantity], s.module, f"float ids for {quantity}")


def test_unsupported_layer():
    assert issubclass(tengrad.UnsupportedLayerError, tengrad.TengradError)
    with pytest.raises(tengrad.UnsupportedLayerError) as info:
        tengrad.compile(nn.ReLU())
    msg = str(info.value)
    assert "ReLU" in msg
    assert "Linear" in msg


def test_registered_layers_cover_the_cases():
    reg = set(tengrad.registered_layers())
    for t in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.Embedding, nn.BatchNorm1d,
              nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
              nn.InstanceNorm3d, nn.RMSNorm, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        assert t in reg, f"{t.__name__} is not registered"
