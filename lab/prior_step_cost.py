"""Step time of the LM task's model (byte LM, 1.24 M parameters, batch 32, context 128) for AdamW, TENGraD
and TENGraD with prior="adam" (all rows: curvature_batch=None), interleaved in one process: median of the
reuse steps and of the curvature steps (update_freq 10) per arm (docs/experiments/lm-prior.md).

    .venv/bin/python lab/prior_step_cost.py --steps 45 --threads 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import tengrad  # noqa: E402
from tasks.stdlib_lm import ByteLM, loss  # noqa: E402


def interleaved(arms: dict, step, steps: int, warmup: int = 5) -> dict:
    """{arm: (reuse step seconds, curvature step seconds)}: ``step(model, opt)`` of every arm in turn, ``steps``
    times; a step is a curvature step when its index is a multiple of 10 (update_freq 10); the first
    ``warmup`` (the first curvature step and caches) are not timed."""
    times = {k: ([], []) for k in arms}
    for it in range(steps):
        for k, (model, opt) in arms.items():
            t0 = time.perf_counter()
            step(model, opt)
            if it >= warmup:
                times[k][it % 10 == 0].append(time.perf_counter() - t0)
    return times


def report(times: dict, base_arm: str, header: str) -> None:
    """Median reuse and curvature step per arm, and as a multiple of ``base_arm``'s reuse step."""
    base = statistics.median(times[base_arm][0])
    print(f"{header}, load {os.getloadavg()[0]:.2f}; median ms (x {base_arm}'s step)")
    for k, (reuse, curv) in times.items():
        r, c = statistics.median(reuse), statistics.median(curv)
        print(f"  {k:22s} reuse {1000 * r:7.1f} ({r / base:.2f}x)   curvature {1000 * c:7.1f} ({c / base:.2f}x)"
              f"   k=10 average {(9 * r + c) / 10 / base:.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=45)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 128), generator=gen)
    y = torch.randint(0, 256, (32, 128), generator=gen)
    arms = {}
    for name, kw in [("AdamW", None), ("TENGraD", {}), ("TENGraD prior='adam'", {"prior": "adam"})]:
        torch.manual_seed(0)
        model = ByteLM()
        opt = (torch.optim.AdamW(model.parameters(), 1e-3) if kw is None
               else tengrad.TENGraD(model, curvature_batch=None, **kw))
        arms[name] = (model, opt)
    def step(model, opt):
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()

    report(interleaved(arms, step, args.steps), "AdamW", f"threads {args.threads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
