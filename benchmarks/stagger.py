"""Whole training steps with and without staggered curvature (tengrad/optim/stagger.py), beside SGD.

Each arm trains its own copy of the model on the same batch: ``opt.zero_grad(); loss.backward();
opt.step()``, everything timed (capture, the curvature work of the blocks due, the step itself).
TENGraD at its defaults (update_freq k = 10: every block refreshes on steps 0, 10, 20, ...) and with
``stagger=True`` (block i on steps t with (t - i) mod 10 == 0), and torch.optim.SGD; one step of each
per round, order alternated, after one warm-up cycle; 1 thread, the thread's CPU clock. Per arm and
step of the cycle (steps mod k) the median over cycles; the table gives, relative to SGD's median
step, the mean over the cycle (what training costs) and the costliest step of the cycle (how even the
steps are).

    .venv/bin/python benchmarks/stagger.py [--cycles 10] [--models transformer 3c1f]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tengrad  # noqa: E402
from benchmarks.capture_overhead import interleave, transformer_lm  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from tengrad.demo.model import three_c_one_f  # noqa: E402

K = 10


def arms(plain, x, y, loss_fn) -> dict:
    def tengrad_step(stagger: bool):
        model = copy.deepcopy(plain)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = tengrad.TENGraD(model, update_freq=K, stagger=stagger, prior=None)

        def step():
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        return step

    model = copy.deepcopy(plain)
    sgd = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)

    def sgd_step():
        sgd.zero_grad()
        loss_fn(model(x), y).backward()
        sgd.step()
    return {"sgd": sgd_step, "tengrad": tengrad_step(False), "tengrad stagger": tengrad_step(True)}


def measure(plain, x, y, loss_fn, cycles: int) -> dict[str, tuple[float, float, list[float]]]:
    """{arm: (mean over the cycle / SGD, costliest step of the cycle / SGD, per step of the cycle)}."""
    steps = arms(plain, x, y, loss_fn)
    times = interleave(steps, cycles * K, K, time.thread_time)     # warm-up: one whole cycle (steps 0..9)
    sgd = statistics.median(times["sgd"])
    out = {}
    for name in ("tengrad", "tengrad stagger"):
        per = [statistics.median(times[name][p::K]) / sgd for p in range(K)]   # step p of each cycle
        out[name] = (statistics.mean(per), max(per), per)
    out["sgd"] = (1.0, 1.0, [sgd])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--models", nargs="+", choices=("transformer", "3c1f"), default=["transformer", "3c1f"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = []
    if "transformer" in args.models:
        ids, tgt = transformer_lm.batch(g, n=16)
        torch.manual_seed(0)
        rows.append(("Transformer LM (examples/transformer_lm.py), batch 16",
                     measure(transformer_lm.TinyLM(), ids, tgt, transformer_lm.loss_fn, args.cycles)))
    if "3c1f" in args.models:
        x = torch.randn(64, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (64,), generator=g)
        torch.manual_seed(0)
        rows.append(("3C1F width 16, batch 64", measure(three_c_one_f(width=16, hidden=64), x, y,
                                                         F.cross_entropy, args.cycles)))
    print(f"machine: {machine()}; {args.cycles} cycles of k = {K} steps, median per step of the cycle, "
          f"cpu clock; load average {os.getloadavg()[0]:.2f} at the end")
    print("| model | SGD step (ms) | TENGraD: mean / costliest step of the cycle (x SGD) "
          "| staggered: mean / costliest (x SGD) | per step of the cycle, default | per step, staggered |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        d, s = r["tengrad"], r["tengrad stagger"]
        print(f"| {name} | {r['sgd'][2][0] * 1e3:.2f} | {d[0]:.2f} / {d[1]:.2f} | {s[0]:.2f} / {s[1]:.2f} "
              f"| {' '.join(f'{v:.2f}' for v in d[2])} | {' '.join(f'{v:.2f}' for v in s[2])} |")


if __name__ == "__main__":
    main()
