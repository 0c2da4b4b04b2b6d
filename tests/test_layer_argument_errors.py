"""A compiled layer refuses bad arguments with a tengrad.TengradError that names the layer: an input or
output gradient of the wrong shape, a batch mismatch, a tangent p with too few / too many / misshapen
tensors, a u of the wrong length, integer gy, float ids for an Embedding; and compile refuses a module
it has no plan for (naming it and the supported layers). The data are the cached float64 setups of
support/layer_cases.py.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import tengrad
from support.layer_cases import layer_setup

QUANTITIES = ("gram", "jvp", "vjp", "jacobian")


@functools.lru_cache(maxsize=None)
def make_setup(case_id: str):
    """The float64 module, x, gy, p, u of the case (support.layer_cases.layer_setup)."""
    s = layer_setup(case_id)
    f64 = torch.float64
    return SimpleNamespace(module=s.module[f64], x=s.x[f64], gy=s.gy[f64], p=s.p[f64], u=s.u[f64])


@functools.lru_cache(maxsize=None)
def compiled(case_id: str):
    return tengrad.compile(make_setup(case_id).module)


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


def _bad_x(s) -> torch.Tensor:
    """An input whose shape the layer cannot accept (or that does not match gy)."""
    x = s.x
    name = type(s.module).__name__
    if name.startswith("Conv"):  # one channel too many
        return torch.cat([x, x[:, :1]], dim=1)
    if name in ("Linear", "LayerNorm"):  # feature dim one too large
        return torch.cat([x, x[..., :1]], dim=-1)
    return torch.cat([x, x[:1]], dim=0)  # Embedding: ids for one more sample than gy has


def _bad_gy(s) -> torch.Tensor:
    return torch.cat([s.gy, s.gy[..., :1]], dim=-1)


def _calls(plan, s, x=None, gy=None, p=None, u=None):
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
    s = make_setup(case_id)
    plan = compiled(case_id)
    _expect_error(_calls(plan, s, x=_bad_x(s))[quantity], s.module, f"bad x for {quantity}")


@pytest.mark.parametrize("case_id", ERROR_CASES)
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_wrong_gy_shape(case_id, quantity):
    s = make_setup(case_id)
    plan = compiled(case_id)
    _expect_error(_calls(plan, s, gy=_bad_gy(s))[quantity], s.module, f"bad gy for {quantity}")


@pytest.mark.parametrize("case_id", ERROR_CASES)
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_gy_batch_mismatch(case_id, quantity):
    s = make_setup(case_id)
    plan = compiled(case_id)
    gy = torch.cat([s.gy, s.gy[:1]], dim=0)
    _expect_error(_calls(plan, s, gy=gy)[quantity], s.module, f"gy batch m+1 for {quantity}")


@pytest.mark.parametrize("case_id", ERROR_CASES)
@pytest.mark.parametrize("kind", ["too_few", "too_many", "bad_shape"])
def test_wrong_p(case_id, kind):
    s = make_setup(case_id)
    plan = compiled(case_id)
    if kind == "too_few":
        p = s.p[:-1]
    elif kind == "too_many":
        p = [*s.p, s.p[-1]]
    else:
        p = [torch.cat([s.p[0], s.p[0][:1]], dim=0), *s.p[1:]]
    _expect_error(lambda: plan.jvp(s.x, s.gy, p), s.module, f"p {kind}")


@pytest.mark.parametrize("case_id", ERROR_CASES)
def test_wrong_u_shape(case_id):
    s = make_setup(case_id)
    plan = compiled(case_id)
    u = torch.cat([s.u, s.u[:1]])
    _expect_error(lambda: plan.vjp(s.x, s.gy, u), s.module, "u of length m+1")


@pytest.mark.parametrize("case_id", ERROR_CASES)
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_wrong_dtype_integer_gy(case_id, quantity):
    s = make_setup(case_id)
    plan = compiled(case_id)
    gy = torch.randint(1, 5, s.gy.shape)
    _expect_error(_calls(plan, s, gy=gy)[quantity], s.module, f"integer gy for {quantity}")


@pytest.mark.parametrize("quantity", QUANTITIES)
def test_wrong_dtype_float_ids_for_embedding(quantity):
    s = make_setup("embedding_2d_ids")
    plan = compiled("embedding_2d_ids")
    x = s.x.to(torch.float64)
    _expect_error(_calls(plan, s, x=x)[quantity], s.module, f"float ids for {quantity}")


def test_unsupported_layer():
    assert issubclass(tengrad.UnsupportedLayerError, tengrad.TengradError)
    with pytest.raises(tengrad.UnsupportedLayerError) as info:
        tengrad.compile(nn.ReLU())
    msg = str(info.value)
    assert "ReLU" in msg
    assert "Linear" in msg
