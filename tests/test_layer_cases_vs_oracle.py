"""Every layer case of support/layer_cases.py in one pass per case.

The case's module, data and float64 oracle J (torch.func) are built once (``layer_setup``) and serve
both dtypes: the float32 setup holds the same numbers, so J is the exact truth for it too. Per case:

1. the oracle itself: J equals a naive per-sample loop of torch.autograd.grad (rel err <= 1e-13), is
   [m, P] over the trainable parameters, float64, and not all zero;
2. ``plan.module`` / ``plan.params`` are the module and its trainable parameters in order, and each
   quantity lists distinct order names;
3. for float64 and float32, ``tengrad.compile(module)`` reproduces, for EVERY order in
   ``plan.orders(q)`` and for ``order=None``:

       plan.gram(x, gy)      == J J^T
       plan.jvp(x, gy, p)    == J @ cat(p)
       plan.vjp(x, gy, u)    == J^T u   (split into parameter shapes)
       plan.jacobian(x, gy)  == J       (split per parameter, [m, *shape])

   rel err <= 1e-10 (float64), <= 1e-4 (float32), in gy's dtype, inputs left unmodified;
4. the float32 plan runs exactly the steps ``repr(plan)`` prints (support/steps_as_printed.py), for
   every quantity and order.

Cases marked ``allow_error`` may instead be refused with ``tengrad.TengradError`` (at compile or at a
call); any other exception, or a refusal of another case, fails. Every check runs and its failures are
listed together.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import tengrad
from support.jacobian_oracle import compare_plan, per_sample_jacobian_loop, trainable_params
from support.layer_cases import CASE_IDS, DTYPES, case_seed, layer_setup
from support.numerics import rel_err
from support.steps_as_printed import check_layer

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@functools.lru_cache(maxsize=None)
def compiled(case_id: str, dtype: torch.dtype):
    """(plan, None), or (None, the TengradError) for an allow_error case that the library refuses."""
    s = layer_setup(case_id)
    try:
        return tengrad.compile(s.module[dtype]), None
    except tengrad.TengradError as exc:
        if s.case.allow_error:
            return None, exc
        raise


def _oracle_failures(s) -> list[str]:
    """J (torch.func) against the naive loop of torch.autograd.grad, on the same float64 values."""
    J = s.J
    out = []
    n_params = sum(p.numel() for _, p in trainable_params(s.oracle_module))
    if J.shape != (s.oracle_x.shape[0], n_params):
        out.append(f"oracle: J has shape {tuple(J.shape)}, expected {(s.oracle_x.shape[0], n_params)}")
    if J.dtype != torch.float64:
        out.append(f"oracle: J is {J.dtype}")
    J_loop = per_sample_jacobian_loop(s.oracle_module, s.oracle_x, s.gy[torch.float64])
    if J_loop.shape != J.shape:
        out.append(f"oracle: the loop's J has shape {tuple(J_loop.shape)}, vmap's {tuple(J.shape)}")
    elif n_params:                 # e.g. LayerNorm without affine: nothing to differentiate
        if not J.abs().sum() > 0:
            out.append("oracle: J is all zero")
        e = rel_err(J, J_loop)
        if not e <= 1e-13:
            out.append(f"oracle: vmap J vs loop J rel_err={e:.3e} > 1e-13")
    return out


def _params_failures(plan, module) -> list[str]:
    out = []
    if plan.module is not module:
        out.append("plan.module is not the compiled module")
    want = trainable_params(module)
    got = list(plan.params)
    if [n for n, _ in got] != [n for n, _ in want]:
        out.append(f"plan.params names {[n for n, _ in got]}, expected {[n for n, _ in want]}")
    elif not all(a is b for (_, a), (_, b) in zip(got, want)):
        out.append("plan.params are not the module's parameter objects")
    for q in ("gram", "jvp", "vjp"):
        orders = list(plan.orders(q))
        if not (orders and all(isinstance(o, str) for o in orders)):
            out.append(f"orders({q!r}) = {orders!r}: expected a non-empty list of names")
        elif len(set(orders)) != len(orders):
            out.append(f"orders({q!r}) = {orders!r} repeats a name")
    return out


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_layer_case(case_id):
    s = layer_setup(case_id)
    failures = _oracle_failures(s)
    for dtype_name, dtype in DTYPES.items():
        plan, refused = compiled(case_id, dtype)
        module = s.module[dtype]
        if refused is not None:     # allowed (compiled() re-raises for other cases): a refusal naming the layer
            assert s.case.allow_error and isinstance(refused, tengrad.TengradError), (case_id, refused)
            assert type(module).__name__ in str(refused), (case_id, str(refused))
            continue
        if dtype == torch.float64:
            failures += [f"[f64] {f}" for f in _params_failures(plan, module)]
        accept = (tengrad.TengradError,) if s.case.allow_error else ()
        failures += [f"[{dtype_name}] {f}" for f in
                     compare_plan(plan, module, s.x[dtype], s.gy[dtype], s.J, s.p[dtype], s.u[dtype], TOL[dtype],
                                  accept=accept)]
        if dtype == torch.float32:
            gen = torch.Generator().manual_seed(case_seed(case_id) + 2)
            failures += [f"[f32] printed steps: {f}" for f in check_layer(plan, s.x[dtype], s.gy[dtype], gen)]
    assert not failures, f"{case_id} failed:\n  " + "\n  ".join(failures)


def test_registered_layers_cover_the_cases():
    reg = set(tengrad.registered_layers())
    for t in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.Embedding, nn.BatchNorm1d,
              nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
              nn.InstanceNorm3d, nn.RMSNorm, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        assert t in reg, f"{t.__name__} is not registered"
