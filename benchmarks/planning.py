"""Planning a new input shape (issue 21, item 3): what a step pays when its shapes were never seen.

The examples' Transformer LM (examples/transformer_lm.py, d_model 16, positions for 512 tokens) is
trained by TENGraD with ``update_freq=1`` (every step a curvature step, so every step plans its shapes)
on batches of 4 sequences whose length is new at every step: 500 lengths 5..504 (never the batch, 4) in a seeded random
order. Per new length, the step is run twice: once on the new shape (``cold``) and once more on the
same shape (``warm``, everything cached), interleaved, 1 thread.

Reported:

* planning per block per new shape: the time spent inside the planning functions (instrumented,
  outermost call only: ``CompiledLayer.sized``, ``Shapes.output``/``term_sizes``, ``paths.choose``,
  the op-level capture's ``_plan``, and the lazily computed costs and choices of ``SizedPlan``),
  summed over the cold step and divided by the number of blocks; median and 90th percentile;
* cold and warm step times (median) and their difference per block;
* the caches' sizes at the end, largest over the blocks, beside their bounds;
* ``--subs N``: the same for N lengths with the costs substituted into the sympy formulas per plan
  (what planning did before the compiled cost functions, tengrad_ir/cost_fn.py), in the same process.

    .venv/bin/python benchmarks/planning.py [--lengths 500] [--subs 40]
"""
from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import sys
import time
import warnings

import sympy
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tengrad  # noqa: E402
from benchmarks.capture_overhead import transformer_lm  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from tengrad.compiler import binding, compiled  # noqa: E402
from tengrad.optim.capture import ops  # noqa: E402
from tengrad.optim.curvature import block as block_mod, paths  # noqa: E402
from tengrad_ir import Cost, SizedPlan  # noqa: E402

_clock = {"depth": 0, "total": 0.0}


def _timed(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _clock["depth"]:
            return fn(*args, **kwargs)
        _clock["depth"] = 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _clock["total"] += time.perf_counter() - start
            _clock["depth"] = 0
    return wrapper


def instrument() -> None:
    """Time every planning function (outermost call only)."""
    compiled.CompiledLayer.sized = _timed(compiled.CompiledLayer.sized)
    binding.Shapes.output = _timed(binding.Shapes.output)
    binding.Shapes.term_sizes = _timed(binding.Shapes.term_sizes)
    paths.choose = _timed(paths.choose)
    ops.OpCapture._plan = _timed(ops.OpCapture._plan)
    for name in ("choice", "_costs", "_runnable"):
        prop = SizedPlan.__dict__[name]
        new = functools.cached_property(_timed(prop.func))
        new.__set_name__(SizedPlan, name)
        setattr(SizedPlan, name, new)


def use_subs() -> None:
    """Costs by sympy substitution per plan (the arm before cost_fn.py; everything else as now)."""
    def subs_costs(self):
        return {id(o): Cost(int(o.flops.subs(self.values)), int(sympy.sympify(o.memory).subs(self.values)))
                for orders in self.orders.values() for o in orders}
    prop = functools.cached_property(_timed(subs_costs))
    prop.__set_name__(SizedPlan, "_costs")
    SizedPlan._costs = prop


def run(lengths: list[int], batch: int = 4) -> dict:
    torch.manual_seed(0)
    model = transformer_lm.TinyLM(seq=max(lengths) + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = tengrad.TENGraD(model, update_freq=1, prior=None)
    gen = torch.Generator().manual_seed(0)

    def step(x, y):
        opt.zero_grad()
        transformer_lm.loss_fn(model(x), y).backward()
        opt.step()

    x0 = torch.randint(0, 12, (batch, 3), generator=gen)   # length 3: not among the timed ones
    step(x0, x0)                  # warm-up: the specs' orders and cost functions, once per layer kind
    planning, cold, warm = [], [], []
    for t in lengths:
        x = torch.randint(0, 12, (batch, t), generator=gen)
        y = torch.randint(0, 12, (batch, t), generator=gen)
        _clock["total"] = 0.0
        start = time.perf_counter()
        step(x, y)
        cold.append(time.perf_counter() - start)
        planning.append(_clock["total"])
        start = time.perf_counter()
        step(x, y)
        warm.append(time.perf_counter() - start)
    blocks = [b for b in opt.blocks if b.plan is not None]
    n = len(opt.blocks)
    per_block = sorted(p / n for p in planning)
    return {"blocks": n, "plan_med": statistics.median(per_block), "plan_p90": per_block[int(0.9 * len(per_block))],
            "cold": statistics.median(cold), "warm": statistics.median(warm),
            "diff": statistics.median(c - w for c, w in zip(cold, warm)) / n,
            "plans": max(len(b.plan._plans) for b in blocks), "outputs": max(len(b.plan.shapes._out) for b in blocks),
            "choices": max(len(b.choices) for b in opt.blocks),
            "op_plans": len(opt._capture.ops._plans), "n": len(lengths)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, default=500)
    ap.add_argument("--subs", type=int, default=0, help="also N lengths with sympy substitution per plan")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    instrument()
    lengths = list(range(5, 5 + args.lengths))
    random.Random(0).shuffle(lengths)
    rows = [("compiled cost functions", run(lengths))]
    if args.subs:
        use_subs()
        rows.append(("sympy subs per plan", run(lengths[:args.subs])))
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at the end (shared CPUs: noisy)")
    print(f"bounds: plans {compiled.PLANS_KEPT}, output shapes {binding.OUTPUTS_KEPT}, path choices "
          f"{block_mod.CHOICES_KEPT} per block; op plans {ops.OP_PLANS_KEPT}")
    print("| costs | new lengths | blocks | planning ms/block/new shape: median (p90) | step new shape (ms) "
          "| step seen shape (ms) | (new - seen) ms/block | caches at the end: plans / outputs / choices / op plans |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['n']} | {r['blocks']} | {r['plan_med'] * 1e3:.3f} ({r['plan_p90'] * 1e3:.3f}) "
              f"| {r['cold'] * 1e3:.1f} | {r['warm'] * 1e3:.1f} | {r['diff'] * 1e3:.2f} "
              f"| {r['plans']} / {r['outputs']} / {r['choices']} / {r['op_plans']} |")


if __name__ == "__main__":
    main()
