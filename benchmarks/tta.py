"""Time to accuracy (the paper's Table 2 and Figures 4-5): SGD, TENGraD and ASDL K-FAC on 3C1F.

Protocol (paper, Appendix A.4.1, with a short tuning budget): SGD and K-FAC are tuned by grid search on
a short budget - the lr (x damping) grids of ``robustness.py`` (10,000 training images, one epoch), whose
JSON this script reads (``--tuning``); the cell with the best test accuracy wins (ties: the earlier
cell). Weight decay is 0 for all (not tuned: one epoch or two do not over-fit). TENGraD runs at its
defaults, ``TENGraD(model)``, untuned. Then every method trains from the same initial weights on the
same batches for each seed, the methods of one seed advanced one step each in turn in ONE process (so
the load of a shared machine hits all alike). The clock counts training steps only; the full test set
is evaluated ``--evals-per-epoch`` times per epoch outside the clock.

    .venv/bin/python benchmarks/tta.py --tuning runs/robustness/robustness.json --seeds 0 1 2
    .venv/bin/python benchmarks/tta.py --quick            # smoke run: digits, a few steps

Reports, per method, the median over seeds (and min-max) of the time to 85/88/90% test accuracy and of
the best test accuracy; writes ``tta.json``, ``tta_seed<k>.json`` (one per seed, so seeds can run in
separate processes and be merged with ``--merge``) and ``tta.png`` (loss and accuracy vs epoch and vs
seconds).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runner import Run, load_average, load_data, round_robin  # noqa: E402

TARGETS = (0.85, 0.88, 0.90)
LABELS = {"sgd": "SGD (tuned)", "tengrad": "TENGraD (defaults)", "kfac": "ASDL K-FAC (tuned)"}


def tuned(path: str | None, method: str, fallback: dict) -> tuple[dict, str]:
    """The best cell of ``method`` in a robustness.json, else ``fallback``."""
    if path and os.path.exists(path):
        with open(path) as f:
            res = [r for r in json.load(f)["results"] if r["method"] == method and not r["diverged"]]
        if res:
            best = max(res, key=lambda r: r["best_acc"])
            return dict(best["hp"]), f"best of {len(res)} cells in {os.path.basename(path)} " \
                                     f"({100 * best['best_acc']:.1f}%)"
    return dict(fallback), "fallback (no tuning file)"


def save_seed(out: str, seed: int, runs: list, meta: dict) -> None:
    """tta_seed<seed>.json; written after every evaluation too (meta {"partial": true}), so that a run
    stopped early keeps its curves (``--merge`` reports such a seed as partial)."""
    path = os.path.join(out, f"tta_seed{seed}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dict(meta=meta, runs=[r.summary() for r in runs]), f, indent=1)
    os.replace(path + ".tmp", path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "digits", "auto"))
    p.add_argument("--train", type=int, default=0, help="training images (0: all 60,000)")
    p.add_argument("--test", type=int, default=0, help="test images (0: all 10,000)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--evals-per-epoch", type=int, default=6)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--hidden", type=int, default=500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", default="sgd,tengrad,kfac")
    p.add_argument("--tuning", default=os.path.join("runs", "robustness", "robustness.json"))
    p.add_argument("--sgd-hp", type=json.loads, default=None, help='override the tuned SGD point, e.g. \'{"lr": 0.03}\'')
    p.add_argument("--kfac-hp", type=json.loads, default=None,
                   help='override the tuned K-FAC point, e.g. \'{"lr": 0.003, "damping": 0.1, "update_freq": 10}\'')
    p.add_argument("--tengrad-hp", type=json.loads, default=None,
                   help='run TENGraD at a given point instead of its defaults (exploration), e.g. \'{"damping": 0.3}\'')
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join("runs", "tta"))
    p.add_argument("--merge", action="store_true", help="only merge tta_seed*.json under --out into the report")
    p.add_argument("--upto-epoch", type=float, default=None,
                   help="with --merge: report every run over its first N epochs only (one budget for seeds that "
                        "ran for different lengths)")
    p.add_argument("--quick", action="store_true", help="smoke run: digits, tiny model, a few steps")
    return p


def summarize(runs: list[dict], methods: list[str]) -> tuple[str, dict]:
    rows, stats = [], {}
    for meth in methods:
        rs = [r for r in runs if r["method"] == meth]
        if not rs:
            continue
        st = {}
        for t in TARGETS:
            ts = [next((p["seconds"] for p in r["points"] if p["test_acc"] >= t), None) for r in rs]
            # a seed that never reaches the target counts as infinitely slow: the median is defined
            # when more than half of the seeds reach it
            med = statistics.median([float("inf") if v is None else v for v in ts])
            st[t] = (None if med == float("inf") else med, ts)
        best = [r["best_acc"] for r in rs]
        total = [r["seconds"] for r in rs]
        stats[meth] = dict(times=st, best=best, total=total, hp=rs[0]["hp"])

        def fmt_t(med, ts):
            lo_hi = [v for v in ts if v is not None]
            spread = f" ({min(lo_hi):.0f}-{max(lo_hi):.0f})" if lo_hi else ""
            miss = sum(v is None for v in ts)
            med_s = f"{med:.0f} s" if med is not None else ("not reached" if not lo_hi else "no median")
            return med_s + spread + (f", {miss}/{len(ts)} seeds never" if miss else "")
        div = sum(bool(r["diverged"]) for r in rs)
        rows.append([LABELS.get(meth, meth), json.dumps(rs[0]["hp"]).replace('"', "")]
                    + [fmt_t(*st[t]) for t in TARGETS]
                    + [f"{100 * statistics.median(best):.2f}% ({100 * min(best):.2f}-{100 * max(best):.2f})",
                       f"{statistics.median(total):.0f} s", f"{div}/{len(rs)}"])
    head = ["method", "hyperparameters"] + [f"time to {100 * t:.0f}%" for t in TARGETS] + \
        ["best test acc", "train time", "diverged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines), stats


def verdict(stats: dict) -> str:
    if "tengrad" not in stats:
        return ""
    t88 = stats["tengrad"]["times"][0.88][0]
    others = [stats[m]["times"][0.88][0] for m in ("sgd", "kfac") if m in stats]
    others = [v for v in others if v is not None]
    lines = []
    if t88 is not None and others:
        ratio = t88 / min(others)
        lines.append(f"TENGraD time to 88% / faster of SGD and K-FAC (medians): {ratio:.2f} "
                     f"(target <= 0.70: {'met' if ratio <= 0.70 else f'missed by {ratio / 0.70:.2f}x'})")
    else:
        lines.append("TENGraD time-to-88% ratio: not defined (a median run never reached 88%)")
    if "kfac" in stats:
        tb, kb = statistics.median(stats["tengrad"]["best"]), statistics.median(stats["kfac"]["best"])
        lines.append(f"best accuracy TENGraD {100 * tb:.2f}% vs K-FAC {100 * kb:.2f}% (medians): "
                     f"{'met' if tb >= kb else f'missed by {100 * (kb - tb):.2f} points'}")
    return "\n".join(lines)


def plot(runs: list[dict], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sgd": "tab:gray", "tengrad": "tab:blue", "kfac": "tab:orange"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    seen = set()
    for r in runs:
        pts = r["points"]
        ep = [p["epoch"] for p in pts]
        sec = [p["seconds"] for p in pts]
        loss = [p["train_loss"] for p in pts]
        acc = [100 * p["test_acc"] for p in pts]
        lab = None if r["method"] in seen else LABELS.get(r["method"], r["method"])
        seen.add(r["method"])
        kw = dict(color=colors.get(r["method"]), alpha=0.8, marker="o", ms=2.5, lw=1.2, label=lab)
        axes[0, 0].plot(ep[1:], loss[1:], **kw)
        axes[0, 1].plot(sec[1:], loss[1:], **kw)
        axes[1, 0].plot(ep, acc, **kw)
        axes[1, 1].plot(sec, acc, **kw)
    axes[0, 0].set(xlabel="epoch", ylabel="training loss (mean since last point)", yscale="log")
    axes[0, 1].set(xlabel="training seconds", ylabel="training loss", yscale="log")
    axes[1, 0].set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(80, 92))
    axes[1, 1].set(xlabel="training seconds", ylabel="test accuracy (%)", ylim=(80, 92))
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.legend()
    for ax in axes[1]:
        for t in TARGETS:
            ax.axhline(100 * t, color="red", lw=0.6, ls=":")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def truncate(run: dict, upto: float | None) -> dict:
    """The run over its first ``upto`` epochs: later points dropped, best accuracy and time recomputed."""
    if upto is None:
        return run
    pts = [p for p in run["points"] if p["epoch"] <= upto + 1e-9]
    return dict(run, points=pts, best_acc=max(p["test_acc"] for p in pts), seconds=pts[-1]["seconds"],
                truncated_at=upto)


def report(out: str, methods: list[str], upto: float | None = None) -> int:
    files = sorted(glob.glob(os.path.join(out, "tta_seed*.json")))
    if not files:
        print(f"no tta_seed*.json under {out}", file=sys.stderr)
        return 1
    runs, metas = [], []
    for fn in files:
        with open(fn) as f:
            d = json.load(f)
        runs += [truncate(r, upto) for r in d["runs"]]
        metas.append(d["meta"])
    text, stats = summarize(runs, methods)
    m = next((x for x in metas if "width" in x), None)
    if m is None:
        print("no seed file with its settings", file=sys.stderr)
        return 1
    title = (f"3C1F-{m['width']} on {m['dataset']} ({m['train']}/{m['test']}), batch {m['batch']}, "
             f"seeds {sorted(x['seed'] for x in metas if 'seed' in x)}"
             + (f", first {upto:g} epoch(s)" if upto is not None else "") + f", {m['threads']} thread(s)")
    png = plot(runs, os.path.join(out, "tta.png"), title)
    with open(os.path.join(out, "tta.json"), "w") as f:
        json.dump(dict(metas=metas, runs=runs), f, indent=1)
    print(title)
    for x in metas:
        if "seed" not in x:
            print("  a seed stopped early (partial, saved by an older tta.py without its settings)")
            continue
        print(f"  seed {x['seed']}: load average {x['load_start']} at start, {x['load_end']} at end; "
              f"{x['wall_seconds']:.0f} s wall" + (" (PARTIAL: stopped before its last step)" if x.get("partial") else ""))
    for meth in methods:
        note = next((x["tuning"].get(meth) for x in metas if meth in x.get("tuning", {})), None)
        if note:
            print(f"  {meth}: {note}")
    print()
    print(text)
    print()
    print(verdict(stats))
    print(f"\nWrote {png}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.quick:
        args.dataset, args.train, args.test, args.epochs = "digits", 256, 128, 0.5
        args.width, args.hidden, args.batch, args.evals_per_epoch = 4, 16, 32, 2
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        return report(args.out, methods, args.upto_epoch)
    torch.set_num_threads(args.threads)
    name, data = load_data(args.dataset, args.train, args.test, 0)
    hps, notes = {}, {}
    for meth, fb in (("sgd", dict(lr=0.03)), ("kfac", dict(lr=0.01, damping=0.1, update_freq=10))):
        hps[meth], notes[meth] = tuned(args.tuning, meth, fb)
        given = getattr(args, f"{meth}_hp")
        if given is not None:
            hps[meth], notes[meth] = dict(given), "given on the command line"
    hps["tengrad"], notes["tengrad"] = {}, "TENGraD(model) defaults"
    if args.quick:
        hps["tengrad"] = dict(update_freq=2)
    if args.tengrad_hp is not None:
        hps["tengrad"], notes["tengrad"] = dict(args.tengrad_hp), "given on the command line (not the defaults)"
    for seed in args.seeds:
        t0, load0 = time.perf_counter(), load_average()
        runs = [Run(LABELS.get(m, m), m, hps[m], data, epochs=args.epochs, seed=seed, batch=args.batch,
                    width=args.width, hidden=args.hidden, evals_per_epoch=args.evals_per_epoch)
                for m in methods]
        meta = dict(seed=seed, dataset=name, train=len(data[1]), test=len(data[3]), epochs=args.epochs,
                    width=args.width, hidden=args.hidden, batch=args.batch, threads=torch.get_num_threads(),
                    load_start=load0, tuning=notes)

        def partial():
            save_seed(args.out, seed, runs, dict(meta, partial=True, load_end=load_average(),
                                                 wall_seconds=time.perf_counter() - t0))
        round_robin(runs, on_point=partial)
        meta.update(load_end=load_average(), wall_seconds=time.perf_counter() - t0)
        save_seed(args.out, seed, runs, meta)
        for r in runs:
            print(f"seed {seed} {r.label:<20} best {100 * r.best_acc():.2f}% "
                  + " ".join(f"t{int(100 * t)}={r.time_to(t)}" for t in TARGETS)
                  + f" train {r.seconds:.0f} s {r.diverged}", flush=True)
    return report(args.out, methods)


if __name__ == "__main__":
    sys.exit(main())
