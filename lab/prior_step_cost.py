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
    times = {k: ([], []) for k in arms}
    for it in range(args.steps):
        for k, (model, opt) in arms.items():
            t0 = time.perf_counter()
            opt.zero_grad()
            loss(model(x), y).backward()
            opt.step()
            if it >= 5:                           # warm-up: the first curvature step and caches
                times[k][it % 10 == 0].append(time.perf_counter() - t0)
    base = statistics.median(times["AdamW"][0])
    print(f"threads {args.threads}, load {os.getloadavg()[0]:.2f}; median ms (x AdamW's step)")
    for k, (reuse, curv) in times.items():
        r, c = statistics.median(reuse), statistics.median(curv)
        print(f"  {k:22s} reuse {1000 * r:7.1f} ({r / base:.2f}x)   curvature {1000 * c:7.1f} ({c / base:.2f}x)"
              f"   k=10 average {(9 * r + c) / 10 / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
