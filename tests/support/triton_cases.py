"""The generated Triton kernels against the torch backend's ``TermRun`` (the reference), under the Triton
interpreter: the layer configurations (cases as data) and the check, for test_triton_kernels_vs_torch_backend.py.

For every term of a case's plan, ``TritonTermRun`` must reproduce in float32 (rel err <= 1e-4) all four
kernel kinds: jacobian(), gram("direct"), gram("factored"), jvp(p, "direct"), jvp(p, "forward"),
vjp(u, "direct"), vjp(u, "weight_grad"). Sizes are tiny and deliberately not multiples of the block
sizes (16/32).

The interpreter battery is the suite's largest piece of single-threaded work, so the test module has it
run in a process of its own, beside the rest of the suite (support/background.py, job
"triton_battery": ``python -m support.triton_cases`` with TRITON_INTERPRET=1 writes {case id: failure
strings} as JSON) and asserts on each case's failures. The same check runs in-process too
(``battery_failures``), e.g. to debug a case: ``TRITON_INTERPRET=1 PYTHONPATH=.:tests python -m
support.triton_cases CASE_ID``. Nothing here imports triton at import time: a process must set
TRITON_INTERPRET=1 before triton is imported (triton decorates its own library then; tengrad imports
triton only when a triton backend runs).
"""
from __future__ import annotations

import json
import sys
import traceback

import torch
from torch import nn

import tengrad

from .numerics import rel_err

__all__ = ["BATTERY", "BATTERY_IDS", "TOL", "term_runs", "check_run", "battery_failures"]

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


def check_run(ref, orders_gram=("direct", "factored")) -> list[str]:
    """Every kernel kind of TritonTermRun against the reference (a torch backend TermRun); returns failure
    strings."""
    from tengrad.codegen.triton import TritonTermRun

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


BATTERY_IDS = [c[0] for c in BATTERY]


def battery_failures(case_ids=None) -> dict[str, list[str]]:
    """{case id: failure strings} for the given cases (all by default): every term of the case's plan
    through ``check_run``; an exception is a failure (its traceback)."""
    by_id = {c[0]: c for c in BATTERY}
    out = {}
    for cid in (BATTERY_IDS if case_ids is None else case_ids):
        _, make, shape = by_id[cid]
        try:
            _, _, _, runs = term_runs(make, shape)
            bad = []
            for ref, _ in runs:
                bad += check_run(ref)
        except Exception:  # noqa: BLE001 - reported as the case's failure
            bad = [f"raised:\n{traceback.format_exc()}"]
        out[cid] = bad
    return out


def main(argv: list[str]) -> int:
    """``[--out FILE] [CASE_ID ...]``: run the battery (under TRITON_INTERPRET=1, which the caller sets)
    with one torch thread and write {case id: failures} as JSON to FILE (default: stdout)."""
    out_path = None
    if argv[:1] == ["--out"]:
        out_path, argv = argv[1], argv[2:]
    torch.set_num_threads(1)
    failures = battery_failures(argv or None)
    text = json.dumps(failures)
    if out_path is None:
        print(text)
    else:
        with open(out_path, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
