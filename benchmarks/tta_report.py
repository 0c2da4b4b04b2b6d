"""The report of ``tta.py``: the table (time to each target, best metric, per method, median over seeds),
the verdict against the issue-24 acceptance, and the curves (training loss and the target metric against
steps and against training seconds). It reads only the JSON that tta.py writes (``meta`` says the task's
metric, direction, targets and acceptance), so ``tta.py --merge`` can report seeds run in separate
processes."""
from __future__ import annotations

import glob
import json
import math
import os
import statistics
import sys

from peers import LABELS, TENGRAD_ARMS, label

COLORS = {"sgd": "tab:gray", "adamw": "tab:green", "soap": "tab:purple", "kfac": "tab:orange",
          "tengrad": "tab:blue", "tengrad-tuned": "tab:cyan",
          "tengrad-prior": "tab:brown", "tengrad-soap": "tab:olive"}


class Spec:
    """The task as the report needs it, rebuilt from a seed file's meta."""

    def __init__(self, meta: dict):
        self.metric, self.higher = meta["metric"], meta["higher_is_better"]
        self.targets, self.acceptance, self.title = meta["targets"], meta["acceptance"], meta["title"]

    def reached(self, v: float, t: float) -> bool:
        return v == v and (v >= t if self.higher else v <= t)

    def fmt(self, v: float) -> str:
        if v != v:
            return "-"
        return f"{100 * v:.2f}%" if self.metric.endswith("acc") else f"{v:.3f}"

    def fmt_target(self, t: float) -> str:
        return f"{100 * t:g}%" if self.metric.endswith("acc") else f"{t:g} bpb"

    def best(self, run: dict) -> float:
        vals = [p[self.metric] for p in run["points"] if p[self.metric] == p[self.metric]]
        if not vals:
            return float("nan")
        return max(vals) if self.higher else min(vals)

    def time_to(self, run: dict, t: float) -> float | None:
        return next((p["seconds"] for p in run["points"] if self.reached(p[self.metric], t)), None)


def _median_time(ts: list) -> float | None:
    """The median with a seed that never reached the target as infinitely slow (defined when more than
    half reached it)."""
    med = statistics.median([math.inf if v is None else v for v in ts])
    return None if med == math.inf else med


def table(spec: Spec, runs: list[dict], methods: list[str]) -> str:
    head = ["method", "hyperparameters"] + [f"time to {spec.fmt_target(t)}" for t in spec.targets] + \
        [f"best {spec.metric}", "train time", "steps", "diverged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        if all(r.get("not_run") for r in rs):
            lines.append(f"| {label(m, rs[0].get('hp'))} | {rs[0]['not_run']} |" + " |" * (len(head) - 2))
            continue
        cells = []
        for t in spec.targets:
            ts = [spec.time_to(r, t) for r in rs]
            med, got = _median_time(ts), [v for v in ts if v is not None]
            s = f"{med:.0f} s" if med is not None else ("not reached" if not got else "no median")
            s += f" ({min(got):.0f}-{max(got):.0f})" if got else ""
            miss = sum(v is None for v in ts)
            cells.append(s + (f", {miss}/{len(ts)} seeds never" if miss else ""))
        best = [spec.best(r) for r in rs]
        fin = [b for b in best if b == b]
        best_s = (f"{spec.fmt(statistics.median(fin))} ({spec.fmt(min(fin))}-{spec.fmt(max(fin))})" if fin else "-")
        hp = json.dumps(rs[0]["hp"]).replace('"', "")
        lines.append("| " + " | ".join([label(m, rs[0].get("hp")), hp] + cells + [
            best_s, f"{statistics.median(r['seconds'] for r in rs):.0f} s",
            f"{statistics.median(r['steps'] for r in rs):.0f}",
            f"{sum(bool(r['diverged']) for r in rs)}/{len(rs)}"]) + " |")
    return "\n".join(lines)


def verdict(spec: Spec, runs: list[dict]) -> str:
    """TENGraD's time to the acceptance target over the fastest peer's: per seed, then the median of those
    ratios, and the ratio of the medians; its best metric against the best peer's."""
    acc = spec.acceptance
    t, limit, peers = acc["target"], acc["ratio"], acc["peers"]
    seeds = sorted({r["seed"] for r in runs})
    lines = []
    for arm in TENGRAD_ARMS:
        mine = {r["seed"]: r for r in runs if r["method"] == arm and not r.get("not_run")}
        if not mine:
            continue
        name = label(arm, next(iter(mine.values())).get("hp"))
        ratios = []
        for s in seeds:
            ran = [r for r in runs if r["seed"] == s and r["method"] in peers and not r.get("not_run")]
            if not ran:             # no peer in this seed: no ratio (not a win)
                continue
            tt = spec.time_to(mine[s], t) if s in mine else None
            pt = [v for v in (spec.time_to(r, t) for r in ran) if v is not None]
            ratios.append(math.inf if tt is None else (tt / min(pt) if pt else 0.0))
        if not ratios:
            lines.append(f"{name}: no peer of {'/'.join(peers)} ran beside it: no verdict")
            continue
        med = statistics.median(ratios)
        per = ", ".join("never" if v == math.inf else ("peers never" if v == 0 else f"{v:.2f}") for v in ratios)
        ok = med <= limit
        lines.append(f"{name}: time to {spec.fmt_target(t)} / fastest of {'/'.join(peers)} that ran, per seed "
                     f"[{per}], median {'not reached' if med == math.inf else f'{med:.2f}'} "
                     f"(acceptance <= {limit}: {'met' if ok else 'missed'})")
    peer_best = {}
    for r in runs:
        if r["method"] in LABELS and not r["method"].startswith("tengrad") and not r.get("not_run"):
            peer_best.setdefault(r["method"], []).append(spec.best(r))
    meds = {m: statistics.median(v) for m, v in peer_best.items() if all(x == x for x in v)}
    for arm in TENGRAD_ARMS:     # the final metric: every peer counts
        ran = [r for r in runs if r["method"] == arm and not r.get("not_run")]
        mine = [spec.best(r) for r in ran]
        if mine and meds and all(x == x for x in mine):
            tb = statistics.median(mine)
            bm = max(meds, key=lambda m: meds[m] if spec.higher else -meds[m])
            ok = spec.reached(tb, meds[bm])
            lines.append(f"best {spec.metric}: {label(arm, ran[0].get('hp'))} {spec.fmt(tb)} vs the best peer, {LABELS[bm]}, "
                         f"{spec.fmt(meds[bm])} (medians): {'no worse' if ok else 'worse'}")
    return "\n".join(lines)


def plot(spec: Spec, runs: list[dict], path: str) -> str | None:
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib: curves not drawn (pip install -e '.[demo]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    seen = set()
    for r in runs:
        pts = r["points"]
        if len(pts) < 2:
            continue
        lab = None if r["method"] in seen else label(r["method"], r.get("hp"))
        seen.add(r["method"])
        kw = dict(color=COLORS.get(r["method"]), alpha=0.8, marker="o", ms=2, lw=1.1, label=lab)
        step, sec = [p["step"] for p in pts], [p["seconds"] for p in pts]
        loss = [p["train_loss"] for p in pts]
        met = [p[spec.metric] * (100 if spec.metric.endswith("acc") else 1) for p in pts]
        axes[0, 0].plot(step[1:], loss[1:], **kw)
        axes[0, 1].plot(sec[1:], loss[1:], **kw)
        axes[1, 0].plot(step, met, **kw)
        axes[1, 1].plot(sec, met, **kw)
    unit = "test accuracy (%)" if spec.metric.endswith("acc") else "validation bits per byte"
    axes[0, 0].set(xlabel="step", ylabel="training loss (mean since last point)", yscale="log")
    axes[0, 1].set(xlabel="training seconds", ylabel="training loss", yscale="log")
    axes[1, 0].set(xlabel="step", ylabel=unit)
    axes[1, 1].set(xlabel="training seconds", ylabel=unit)
    scale = 100 if spec.metric.endswith("acc") else 1
    vals = [p[spec.metric] * scale for r in runs for p in r["points"] if p[spec.metric] == p[spec.metric]]
    lo, hi = min(spec.targets) * scale, max(spec.targets) * scale
    pad = (hi - lo) or abs(hi) * 0.1
    if vals:   # the targets' band, widened to the data, but not to a start far from it
        if spec.higher:
            ylim = (max(min(min(vals), lo - 3 * pad), lo - 10 * pad), max(max(vals), hi) + pad)
        else:
            ylim = (min(min(vals), lo) - pad, min(max(max(vals), hi + 3 * pad), hi + 10 * pad))
    for ax in axes[1]:
        for t in spec.targets:
            ax.axhline(t * scale, color="red", lw=0.6, ls=":")
        if vals:
            ax.set_ylim(*ylim)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(spec.title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def truncate(run: dict, upto: float | None, spec: Spec | None = None) -> dict:
    """The run over its first ``upto`` epochs (one budget for seeds that ran for different lengths): later
    points dropped, the best metric and the time recomputed (``spec``: the task's metric; without it,
    test accuracy)."""
    if upto is None or not run["points"]:
        return run
    pts = [p for p in run["points"] if p["epoch"] <= upto + 1e-9]
    out = dict(run, points=pts, seconds=pts[-1]["seconds"], steps=pts[-1].get("step", run.get("steps")),
               truncated_at=upto)
    if spec is not None:
        out["best"] = spec.best(out)
    if "test_acc" in pts[-1]:
        out["best_acc"] = max(p["test_acc"] for p in pts)
    return out


def report(out: str, methods: list[str], upto: float | None = None) -> int:
    files = sorted(glob.glob(os.path.join(out, "tta_seed*.json")))
    if not files:
        print(f"no tta_seed*.json under {out}", file=sys.stderr)
        return 1
    metas, runs = [], []
    for fn in files:
        with open(fn) as f:
            d = json.load(f)
        metas.append(d["meta"])
        runs += d["runs"]
    spec = Spec(metas[0])
    runs = [truncate(r, upto, spec) for r in runs]
    methods = [m for m in methods if any(r["method"] == m for r in runs)] or sorted({r["method"] for r in runs})
    png = plot(spec, runs, os.path.join(out, "tta.png"))
    with open(os.path.join(out, "tta.json"), "w") as f:
        json.dump(dict(metas=metas, runs=runs), f, indent=1)
    print(spec.title + (f", first {upto:g} epoch(s)" if upto is not None else ""))
    for x in metas:
        print(f"  seed {x['seed']}: {x['machine']}; load average {x['load_start']} at start, {x['load_end']} at end; "
              f"{x['wall_seconds']:.0f} s wall" + (" (PARTIAL: stopped before its last step)" if x.get("partial") else ""))
    for m, note in metas[0].get("tuning", {}).items():
        print(f"  {m}: {note}")
    print()
    print(table(spec, runs, methods))
    print()
    print(verdict(spec, runs))
    if png:
        print(f"\nWrote {png}")
    return 0
