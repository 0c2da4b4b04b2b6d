"""Time to a target (the paper's Table 2 and Figures 4-5) on three tasks (benchmarks/tasks/):

* ``3c1f``: the paper's 3C1F on all of Fashion-MNIST (targets 85/88/90% test accuracy; batch 128,
  2 epochs, 6 evaluations per epoch: the settings this script has always used);
* ``resnet``: a BatchNorm WideResNet-16 (12/24/48 channels) on Fashion-MNIST (targets 90/92%);
* ``lm``: a byte-level causal Transformer LM (1.24 M parameters, context 128) on the standard library's
  source, split by file (targets 3.0/2.5/2.2 validation bits per byte).

Methods (peers.py): SGD with momentum, AdamW, SOAP (pytorch-optimizer), ASDL K-FAC, TENGraD at its
defaults (only weight decay tuned) and TENGraD at a tuned (lr, damping). Protocol (paper, Appendix A.4.1,
with a short tuning budget; tune.py): each method's grid (lr x weight decay; lr x damping for the
curvature methods) is trained cell by cell for ``task.tune_steps`` steps from seed 0; the best target
metric wins. Cells are cached in ``<out>/tuning.json`` (and read from ``--tuning`` files, e.g.
robustness.py's JSON for 3C1F). Then, for each seed, every method trains from the same initial weights on
the same batches, one step each in turn in ONE process (the load of a shared machine hits all alike); the
clock counts training steps only, evaluations run outside it. A method whose package is missing is
reported as "not run".

    .venv/bin/python benchmarks/tta.py --task lm --seeds 0 1 2
    .venv/bin/python benchmarks/tta.py --task resnet --quick      # smoke run: tiny model, a few steps

Writes ``tta_seed<k>.json`` (one per seed, after every evaluation too, so seeds can run in separate
processes and be merged with ``--merge``), ``tta.json`` and ``tta.png`` (training loss and the target
metric against steps and against training seconds) under ``--out``, and prints the table and the verdict
against the issue-24 acceptance.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402
from common import machine  # noqa: E402
from peers import METHODS, available  # noqa: E402
from runner import load_average  # noqa: E402
from task_run import TaskRun, round_robin  # noqa: E402
from tta_report import report, truncate  # noqa: E402,F401  (truncate: tta.truncate, as before)
from tune import tuned_point  # noqa: E402

# task settings a flag may override (None: the task's default); each task takes the ones it knows
TASK_FLAGS = {"dataset": str, "train": int, "test": int, "epochs": float, "evals_per_epoch": int, "width": int,
              "hidden": int, "batch": int, "eval_every": int, "steps": int, "context": int, "d": int, "layers": int,
              "n_val": int, "schedule": str}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="3c1f", choices=tasks.NAMES)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    for name, typ in TASK_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help="task setting (default: the task's)")
    p.add_argument("--targets", type=float, nargs="+", default=None, help="override the task's targets")
    p.add_argument("--tuning", nargs="*", default=None,
                   help="tuning files to read first (default for 3c1f: runs/robustness/robustness.json)")
    p.add_argument("--tune-steps", type=int, default=None, help="steps of one tuning cell (default: the task's)")
    p.add_argument("--no-tune", action="store_true", help="skip tuning: untuned methods run at the task's fallback point")
    p.add_argument("--hp", action="append", default=[], metavar="METHOD=JSON",
                   help='run METHOD at a given point, e.g. --hp \'adamw={"lr": 0.003}\' (repeatable)')
    p.add_argument("--sgd-hp", type=json.loads, default=None, help="same as --hp sgd=JSON")
    p.add_argument("--kfac-hp", type=json.loads, default=None, help="same as --hp kfac=JSON")
    p.add_argument("--tengrad-hp", type=json.loads, default=None,
                   help="run the TENGraD (defaults) arm at a given point instead (exploration)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="default runs/tta (3c1f), runs/tta_resnet, runs/tta_lm")
    p.add_argument("--merge", action="store_true", help="only merge tta_seed*.json under --out into the report")
    p.add_argument("--upto-epoch", type=float, default=None, help="with --merge: every run over its first N epochs")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data and model, a few steps (< 1 min)")
    return p


def commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def given_points(args) -> dict:
    out = {}
    for item in args.hp:
        meth, _, js = item.partition("=")
        out[meth.strip()] = json.loads(js)
    for meth in ("sgd", "kfac", "tengrad"):
        v = getattr(args, f"{meth}_hp")
        if v is not None:
            out[meth] = v
    return out


def save_seed(out: str, seed: int, runs: list, meta: dict) -> None:
    path = os.path.join(out, f"tta_seed{seed}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dict(meta=meta, runs=[r.summary() for r in runs]), f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        available(m)                                  # raises on an unknown name, listing the valid ones
    out = args.out or os.path.join("runs", "tta" if args.task == "3c1f" else f"tta_{args.task}")
    os.makedirs(out, exist_ok=True)
    if args.merge:
        return report(out, methods, args.upto_epoch)
    torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in TASK_FLAGS if getattr(args, k) is not None}
    task = tasks.get(args.task, args.quick, **settings)
    if args.targets:
        task.targets = tuple(args.targets)
    if args.quick:      # smoke run: two cells per grid (the first hyperparameter's first two values)
        task.grids = {m: {k: v[:2] if i == 0 else v[:1] for i, (k, v) in enumerate(g.items())}
                      for m, g in task.grids.items()}
    if args.tune_steps:
        task.tune_steps = args.tune_steps
    data = task.load()
    print(f"{task.title}; {task.steps} steps, evaluation every {task.eval_every}; {machine()}; load {load_average()}",
          flush=True)
    sources = args.tuning if args.tuning is not None else (
        [os.path.join("runs", "robustness", "robustness.json")] if args.task == "3c1f" else [])
    given = given_points(args)
    hps, notes = {}, {}
    for m in methods:
        if m in given:
            hps[m], notes[m] = dict(given[m]), "given on the command line"
        elif available(m):
            hps[m], notes[m] = {}, available(m)
        else:
            hps[m], notes[m] = tuned_point(task, data, m, sources, os.path.join(out, "tuning.json"),
                                           tune=not args.no_tune, log=lambda s: print(s, flush=True))
        print(f"  {m}: {json.dumps(hps[m])}  ({notes[m]})", flush=True)
    for seed in args.seeds:
        t0, load0 = time.perf_counter(), load_average()
        runs = [TaskRun(m, m, hps[m], task, data, steps=task.steps, seed=seed) for m in methods]
        meta = dict(task=task.name, title=task.title, metric=task.metric, higher_is_better=task.higher_is_better,
                    targets=list(task.targets), acceptance=task.acceptance, settings=task.settings,
                    tune_steps=task.tune_steps, seed=seed, machine=machine(), commit=commit(),
                    load_start=load0, tuning=notes)

        def partial():
            save_seed(out, seed, runs, dict(meta, partial=True, load_end=load_average(),
                                            wall_seconds=time.perf_counter() - t0))
        round_robin(runs, on_point=partial)
        meta.update(load_end=load_average(), wall_seconds=time.perf_counter() - t0)
        save_seed(out, seed, runs, meta)
        for r in runs:
            print(f"seed {seed} {r.method:<14} best {task.metric} {task.fmt(r.best())} "
                  + " ".join(f"t({t:g})={r.time_to(t)}" for t in task.targets)
                  + f" train {r.seconds:.0f} s {r.diverged or r.not_run}", flush=True)
    return report(out, methods)


if __name__ == "__main__":
    sys.exit(main())
