"""Both per-sample conv Jacobian kernels (``conv_kernels.per_sample_kernel``) against the torch.func oracle.

The torch backend computes J[n, param] of a convolution by im2col + bmm (ungrouped convs) or by
torch's grouped weight gradient with the batch folded into the groups (N_g > 1). Each kernel is
forced here on every convolution case of ``layer_cases`` (both run on every case, whatever the rule
would pick), in float64, and J, K = J J^T (direct order) and J^T u are compared with the float64
oracle (rel err <= 1e-10); im2col + bmm also runs with a chunk smaller than one sample's unfolded
input (one sample per bmm; several samples with a short last chunk: test_chunk_remainder_and_chunk_windowing);
the float64 oracle J is computed once per case. The rule and the printed plan are
checked on a grouped and an ungrouped conv, with 1 and 2 threads and a small and a large batch.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import tengrad
from tengrad.codegen import conv_kernels
from support.layer_cases import CASES, make_setup_input
from support.jacobian_oracle import per_sample_jacobian, trainable_params
from support.numerics import rel_err

BY_ID = {c.id: c for c in CASES}
CONV_CASES = [c for c in CASES if not c.allow_error and c.id.startswith("conv") and not c.id.startswith("convt")]
TOL = 1e-10


@functools.lru_cache(maxsize=None)
def _setup(case_id: str):
    """(module, x, gy, J, plan): float64, random parameters, J the torch.func oracle [m, P]; the
    kernel is looked up at each call, so one compiled plan serves every variant."""
    case = BY_ID[case_id]
    torch.manual_seed(0)
    mod = case.make_module().double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = make_setup_input(case, gen, torch.float64)
    with torch.no_grad():
        gy = torch.randn(mod(x).shape, generator=gen, dtype=torch.float64)
    return mod, x, gy, per_sample_jacobian(mod, x, gy), tengrad.compile(mod)


def test_the_cases_cover_both_rule_branches():
    ids = {c.id for c in CONV_CASES}
    assert {"conv2d_basic", "conv2d_groups2", "conv1d_depthwise"} <= ids, sorted(ids)
    assert len(CONV_CASES) >= 20


VARIANTS = [(conv_kernels.IM2COL, None), (conv_kernels.IM2COL, 1),
            (conv_kernels.GROUPED, None)]   # chunk bytes: default (whole batch here), one sample per bmm


@pytest.mark.parametrize("kernel, chunk_bytes", VARIANTS, ids=[f"{k}-{c}" for k, c in VARIANTS])
@pytest.mark.parametrize("case_id", [c.id for c in CONV_CASES])
def test_per_sample_kernel_against_oracle(case_id, kernel, chunk_bytes, monkeypatch):
    mod, x, gy, J, plan = _setup(case_id)
    if chunk_bytes is not None:
        monkeypatch.setattr(conv_kernels, "IM2COL_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(conv_kernels, "per_sample_kernel", lambda *args: kernel)
    plan.trace = []
    pieces = plan.jacobian(x, gy)
    got = torch.cat([j.reshape(x.shape[0], -1) for j in pieces], dim=1)
    assert rel_err(got, J) <= TOL, (case_id, kernel, rel_err(got, J))
    assert rel_err(plan.gram(x, gy, order="direct"), J @ J.T) <= TOL
    u = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    vjp = torch.cat([t.reshape(-1) for t in plan.vjp(x, gy, u, order="direct")])
    assert rel_err(vjp, J.T @ u) <= TOL
    assert len(pieces) == len(trainable_params(mod))
    ran = {s.op for _, _, _, steps in plan.trace for s in steps}
    plan.trace = None
    if mod.weight.requires_grad:                 # the per-sample conv kernel ran (not some other order)
        assert "conv_weight_grad" in ran, ran


def test_chunk_remainder_and_chunk_windowing():
    """m = 5 samples with a chunk of 2: chunks 2, 2, 1 (the last one short), each windowed alone (padding 1,
    stride 2) and, once the binding has the windowed X, sliced from it: both match the oracle."""
    torch.manual_seed(1)
    mod = nn.Conv2d(3, 4, 3, padding=1, stride=2).double()
    x = torch.randn(5, 3, 7, 7, dtype=torch.float64)
    gy = torch.randn(5, 4, 4, 4, dtype=torch.float64)
    J = per_sample_jacobian(mod, x, gy)[:, :mod.weight.numel()]
    plan = tengrad.compile(mod)
    run = plan._runs(x, gy)[1][0][0]
    c = run.conv
    gc = c.y(run.g, run.spec.output_indices)
    old = conv_kernels.IM2COL_CHUNK_BYTES
    try:
        conv_kernels.IM2COL_CHUNK_BYTES = 2 * 3 * 9 * 16 * 8 + 7   # two samples of unfolded input
        assert run._xw is None
        a = c.per_sample_im2col_bmm(run.x_chunk, gc)                  # chunks windowed alone
        assert run._xw is None
        _ = run.xw
        b = c.per_sample_im2col_bmm(run.x_chunk, gc)                  # chunks sliced from xw
    finally:
        conv_kernels.IM2COL_CHUNK_BYTES = old
    assert rel_err(a.reshape(5, -1), J) <= TOL
    assert rel_err(b.reshape(5, -1), J) <= TOL
    grouped = c.per_sample_weight_grad(c.x(run.xw, run.x_idx), gc, kernel=conv_kernels.GROUPED)
    assert rel_err(grouped.reshape(5, -1), J) <= TOL


RULE = [(1, 1, 8, conv_kernels.IM2COL), (2, 1, 8, conv_kernels.GROUPED),
        (1, 2, 8, conv_kernels.IM2COL),                    # 8 x 36 x 25 unfolded elements: a small batch
        (1, 2, 4096, conv_kernels.GROUPED),                # 4096 x 900 > 2^21: many chunks, > 1 thread
        (1, 1, 4096, conv_kernels.IM2COL)]


@pytest.mark.parametrize("groups, threads, m, want", RULE, ids=[f"g{g}-t{t}-m{m}" for g, t, m, _ in RULE])
def test_rule_and_plan_print_the_kernel(groups, threads, m, want, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    mod = nn.Conv2d(4, 6, 3, groups=groups, padding=1)
    plan = tengrad.compile(mod)
    x, gy = torch.randn(m, 4, 5, 5), torch.randn(m, 6, 5, 5)
    _, runs = plan._runs(x, gy)
    assert runs[0][0].conv.kernel == want
    plan.jacobian(x, gy)
    text = repr(plan)
    s = "s" if threads > 1 else ""
    assert f"per sample (N_g = {groups}, {threads} thread{s}): {conv_kernels.KERNEL_TEXT[want]}" in text, text
    other = conv_kernels.GROUPED if want == conv_kernels.IM2COL else conv_kernels.IM2COL
    assert conv_kernels.KERNEL_TEXT[other] not in text
