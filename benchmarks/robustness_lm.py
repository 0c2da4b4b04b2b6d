"""Robustness across hyperparameters on the byte-level LM task (tasks/stdlib_lm.py), as robustness.py
does on 3C1F: a grid of TENGraD's lr x damping (4 x 4 by default), each cell trained alone from the same
initial weights on the same batches (seed 0) for ``--steps`` steps; a cell is its best validation bits per
byte, whether it reached ``--target`` and whether it diverged (a non-finite loss or an optimizer that
raises; no exception escapes a cell). Timing plays no part.

    .venv/bin/python benchmarks/robustness_lm.py                 # 16 cells of 750 steps
    .venv/bin/python benchmarks/robustness_lm.py --quick         # smoke run: tiny model, 4 steps a cell
    .venv/bin/python benchmarks/robustness_lm.py --rule defaults  # the defaults' rule on its own lr scale

Writes ``robustness_lm.json`` (after every cell, so a stopped run keeps its cells) and
``robustness_lm.png`` (a heat map: best bits per byte per cell, "x" where the run diverged, a red box
where it reached the target) under ``--out``, and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402
from common import machine  # noqa: E402
from runner import load_average  # noqa: E402
from task_run import TaskRun  # noqa: E402


def parse_floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rule", choices=("paper", "defaults"), default="paper",
                   help="the step gridded: 'paper' (prior=None, the paper's natural-gradient step) or 'defaults' "
                        "(TENGraD(model)'s prior='soap' with step_rule='adam')")
    p.add_argument("--lrs", type=parse_floats, default=None,
                   help="default 0.03,0.1,0.3,1 (paper); 1e-3,3e-3,6e-3,1e-2 (defaults)")
    p.add_argument("--dampings", type=parse_floats, default=None,
                   help="default 0.1,0.3,1,3 (paper); 0.03,0.1,0.3,1 (defaults)")
    p.add_argument("--steps", type=int, default=750, help="training steps per cell")
    p.add_argument("--target", type=float, default=None, help="validation bits per byte (default: the task's first)")
    p.add_argument("--kl-clip", default="default", help="TENGraD kl_clip: 'default', 'none', or a number")
    p.add_argument("--update-freq", type=int, default=None, help="TENGraD update_freq (default: its default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join("runs", "robustness_lm"))
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model and corpus, 4 steps per cell")
    return p


GRIDS = {"paper": ("0.03,0.1,0.3,1", "0.1,0.3,1,3"), "defaults": ("1e-3,3e-3,6e-3,1e-2", "0.03,0.1,0.3,1")}


def cell_hp(args, lr: float, damping: float) -> dict:
    hp = dict(lr=lr, damping=damping)
    if getattr(args, "rule", "paper") == "paper":
        hp["prior"] = None          # the paper's step (the defaults' rule is on another lr scale)
    if args.update_freq is not None:
        hp["update_freq"] = args.update_freq
    if args.kl_clip != "default":
        hp["kl_clip"] = None if args.kl_clip.lower() == "none" else float(args.kl_clip)
    return hp


def cell_text(r: dict | None, target: float) -> str:
    if r is None:
        return "·"
    b = r["best"]
    txt = f"{b:.3f}" if b == b else "-"
    return txt + (" **x**" if r["diverged"] else "") + (" ✓" if b == b and b <= target else "")


def table(results: list[dict], lrs, dampings, target: float) -> str:
    n_ok = sum(r["best"] == r["best"] and r["best"] <= target for r in results)
    n_div = sum(bool(r["diverged"]) for r in results)
    lines = [f"TENGraD: best validation bits per byte per cell; rows damping, columns lr; x = diverged, "
             f"✓ = reached {target:g}. {n_ok}/{len(results)} cells reach {target:g}, {n_div} diverged.", "",
             "| damping \\ lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for d in dampings:
        row = [cell_text(next((r for r in results if r["hp"]["lr"] == lr and r["hp"]["damping"] == d), None), target)
               for lr in lrs]
        lines.append(f"| {d:g} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def heatmap(results: list[dict], lrs, dampings, target: float, path: str, title: str) -> str | None:
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib: heat map not drawn")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rs = {(r["hp"]["damping"], r["hp"]["lr"]): r for r in results}
    z = np.array([[rs[d, lr]["best"] if (d, lr) in rs else np.nan for lr in lrs] for d in dampings], dtype=float)
    fig, ax = plt.subplots(figsize=(5.6, 4.6), constrained_layout=True)
    im = ax.imshow(np.ma.masked_invalid(z), cmap="viridis_r", origin="lower")
    for i, d in enumerate(dampings):
        for j, lr in enumerate(lrs):
            r = rs.get((d, lr))
            if r is None:
                ax.text(j, i, "not run", ha="center", va="center", fontsize=7, color="gray")
                continue
            ax.text(j, i, ("-" if z[i, j] != z[i, j] else f"{z[i, j]:.2f}") + ("\nx" if r["diverged"] else ""),
                    ha="center", va="center", fontsize=8, color="white")
            if z[i, j] == z[i, j] and z[i, j] <= target:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs])
    ax.set_yticks(range(len(dampings)), [f"{v:g}" for v in dampings])
    ax.set(xlabel="lr", ylabel="damping", title="TENGraD")
    fig.colorbar(im, ax=ax, shrink=0.8, label="best validation bits per byte")
    fig.suptitle(title + f"\n(red box: reached {target:g} bpb; x diverged)", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    lrs, dampings = GRIDS[args.rule]
    args.lrs = args.lrs if args.lrs is not None else parse_floats(lrs)
    args.dampings = args.dampings if args.dampings is not None else parse_floats(dampings)
    if args.quick:
        args.steps = 4
    torch.set_num_threads(args.threads)
    task = tasks.get("lm", args.quick)
    target = args.target if args.target is not None else task.targets[0]
    data = task.load()
    os.makedirs(args.out, exist_ok=True)
    step = "the paper's step (prior=None)" if args.rule == "paper" else "the defaults' rule"
    title = f"{task.title}; {step}; {args.steps} steps per cell, seed {args.seed}"
    print(f"{title}; {machine()}; load {load_average()}", flush=True)
    meta = dict(title=title, rule=args.rule, settings=task.settings, steps=args.steps, target=target,
                kl_clip=args.kl_clip, update_freq=args.update_freq, seed=args.seed, machine=machine(),
                load_start=load_average())
    results, t0 = [], time.perf_counter()
    path = os.path.join(args.out, "robustness_lm.json")
    for d in args.dampings:
        for lr in args.lrs:
            hp = cell_hp(args, lr, d)
            r = TaskRun(f"tengrad {hp}", "tengrad", hp, task, data, steps=args.steps, seed=args.seed)
            while not r.done:
                r.advance()
            s = r.summary()
            results.append(s)
            print(f"  {json.dumps(hp):<40} best {task.fmt(s['best'])} bpb {s['seconds']:6.1f} s {s['diverged']}",
                  flush=True)
            meta.update(load_end=load_average(), total_seconds=time.perf_counter() - t0)
            with open(path + ".tmp", "w") as f:
                json.dump(dict(meta=meta, results=results), f, indent=1)
            os.replace(path + ".tmp", path)
    png = heatmap(results, args.lrs, args.dampings, target, os.path.join(args.out, "robustness_lm.png"), title)
    print(table(results, args.lrs, args.dampings, target))
    print(f"\nWrote {path}" + (f" and {png}" if png else "") + f"; total {meta['total_seconds']:.0f} s; "
          f"load {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
