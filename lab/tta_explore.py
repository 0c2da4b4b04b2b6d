"""Exploration for benchmarks/tta.py: several hyperparameter points (and SGD) advanced round-robin in ONE
process.

Each variant is a ``runner.Run`` (same initial weights and batches for a seed, evaluation outside the
clock), so several TENGraD points and a reference can be compared step for step and, within one
process, in ms per step. Used to choose TENGraD's default kl_clip and the noise ratio
(docs/experiments/time-to-accuracy.md). It uses benchmarks/runner.py.

    .venv/bin/python lab/tta_explore.py --seed 0 --steps 380 --out runs/ex/r1a.json \\
        --variants '{"sgd": ["sgd", {"lr": 0.03}], "def": ["tengrad", {}], "c3e-3": ["tengrad", {"kl_clip": 0.003}]}'
    .venv/bin/python lab/tta_explore.py --quick --out /tmp/x.json     # smoke run: digits

Prints the test accuracy of every variant at each evaluation; writes, per variant, the run summary,
ms per step, the first step at 85% and 88%, and the fraction of TENGraD steps whose KL clip was active.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from runner import Run, load_average, load_data  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", type=json.loads, default={"sgd": ["sgd", {"lr": 0.03}], "tengrad": ["tengrad", {}]},
                   help='{"name": ["sgd" | "tengrad" | "kfac", {hyperparameters}], ...}')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=380)
    p.add_argument("--evals-per-epoch", type=int, default=16)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON file")
    p.add_argument("--quick", action="store_true", help="smoke run: digits, tiny model, a few steps")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dataset, train, test, batch, width, hidden = "fashion-mnist", 0, 0, 128, a.width, 500
    if a.quick:
        dataset, train, test, batch, width, hidden, a.steps, a.evals_per_epoch = "digits", 256, 128, 32, 4, 16, 8, 2
    _, data = load_data(dataset, train, test, 0)
    per_epoch = len(data[1]) // batch
    runs = {n: Run(n, m, hp, data, epochs=a.steps / per_epoch, seed=a.seed, batch=batch, width=width,
                   hidden=hidden, evals_per_epoch=a.evals_per_epoch) for n, (m, hp) in a.variants.items()}
    clipped = {n: [] for n in runs}
    load_start = load_average()
    while not all(r.done for r in runs.values()):
        seen = {n: len(r.points) for n, r in runs.items()}
        for n, r in runs.items():
            if r.done:
                continue
            r.advance()
            if r.method == "tengrad" and not r.diverged:
                clipped[n].append(r.opt.last_nu < 1.0)
        if any(len(r.points) != seen[n] for n, r in runs.items()):
            print(f"step {max(r.steps for r in runs.values()):4d} " + "  ".join(
                f"{n}=" + (f"{100 * r.points[-1].test_acc:.2f}" if r.points else "-") + ("X" if r.diverged else "")
                for n, r in runs.items()),
                flush=True)

    def first(r, acc):
        return next((round(pt.epoch * per_epoch) for pt in r.points if pt.test_acc >= acc), None)

    res = dict(seed=a.seed, steps=a.steps, load_start=load_start, load_end=load_average(), runs={})
    for n, r in runs.items():
        res["runs"][n] = dict(summary=r.summary(), ms_per_step=1000 * r.seconds / max(1, r.steps),
                              step85=first(r, 0.85), step88=first(r, 0.88),
                              clipped_frac=sum(clipped[n]) / len(clipped[n]) if clipped[n] else None)
        x = res["runs"][n]
        print(f"{n}: best {100 * r.best_acc():.2f}% 85% at step {x['step85']} 88% at step {x['step88']} "
              f"{x['ms_per_step']:.0f} ms/step clip active {x['clipped_frac']} {r.diverged}", flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
