"""What ``curvature_memory`` trades (issue 23, item 2): ViT-tiny (benchmarks/zoo_models.py, batch 32),
TENGraD uncapped and capped, SGD beside them: the curvature kept by all blocks (curvature/memory.py
``kept_bytes``) and the median time of a curvature step and of a reuse step, interleaved in one process.

    .venv/bin/python lab/curvature_memory.py --caps 0 64 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import tengrad
from tengrad.optim.curvature import memory
from zoo_models import build

NEVER = 10 ** 9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_tiny")
    ap.add_argument("--caps", type=float, nargs="+", default=[0.0, 64.0], help="caps in MB (besides none)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    factory, x, y, loss, size = build(args.model)
    arms = {}
    m = factory()
    sgd = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    arms["sgd"] = (m, sgd, None)
    for cap in [None] + args.caps:
        for k, kind in ((1, "curvature"), (NEVER, "reuse")):
            m = factory()
            opt = tengrad.TENGraD(m, 1e-3, 1.0, momentum=0.9, update_freq=k,
                                  curvature_memory=None if cap is None else int(cap * 2 ** 20))
            arms[f"tengrad cap={'none' if cap is None else f'{cap:g} MB'} {kind}"] = (m, opt, k)

    def step(m, opt):
        opt.zero_grad()
        loss(m(x), y).backward()
        opt.step()

    for m, opt, _ in arms.values():       # warm-up (the reuse arms take their one curvature step here)
        step(m, opt)
    times = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, (m, opt, _) in arms.items():
            t = time.perf_counter()
            step(m, opt)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["sgd"])
    print(f"{size}; torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}")
    print("| arm | ms (x SGD) | curvature kept MB | blocks moved to x, gy |")
    print("|---|---|---|---|")
    for name, (m, opt, _) in arms.items():
        t = statistics.median(times[name])
        kept = moved = ""
        if name != "sgd":
            kept = f"{sum(memory.kept_bytes(b.curv.rows) for b in opt.blocks if b.curv is not None) / 2 ** 20:.0f}"
            moved = f"{sum(b.memory_reuse for b in opt.blocks)} of {len(opt.blocks)}"
        print(f"| {name} | {t * 1e3:.1f} ({t / base:.2f}x) | {kept} | {moved} |")


if __name__ == "__main__":
    main()
