"""Robustness across hyperparameters (the paper's Figures 9-10): lr x damping grids for TENGraD and ASDL
K-FAC and an lr sweep for SGD on 3C1F, each cell trained from the same initial weights on the same
batches for a short budget; a cell is its best test accuracy and whether it diverged.

    .venv/bin/python benchmarks/robustness.py                  # 10,000 Fashion-MNIST images, 1 epoch
    .venv/bin/python benchmarks/robustness.py --quick          # smoke run: digits, a few steps

Writes ``robustness.json``, ``robustness.png`` (heat maps: best test accuracy per cell, "x" where the
run diverged) and prints a markdown table (the one in benchmarks/README.md). A diverging run (non-finite
loss, or an optimizer that raises) is reported as such; no exception escapes a cell. A method whose
package is missing (ASDL's K-FAC) is not run: it is named once and has no cells. Every cell runs
on its own (timing plays no part here; the grid is also the tuning grid of ``tta.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runner import Run, load_average, load_data  # noqa: E402


def parse_floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "digits", "auto"))
    p.add_argument("--train", type=int, default=10000, help="training images (seeded subset)")
    p.add_argument("--test", type=int, default=2000, help="test images (seeded subset)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--evals-per-epoch", type=int, default=4)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--hidden", type=int, default=500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lrs", type=parse_floats, default=parse_floats("0.01,0.03,0.1,0.3,1"),
                   help="lr values of the TENGraD and K-FAC grids")
    p.add_argument("--dampings", type=parse_floats, default=parse_floats("0.01,0.1,1,10"))
    p.add_argument("--sgd-lrs", type=parse_floats, default=parse_floats("0.003,0.01,0.03,0.1,0.3"))
    p.add_argument("--update-freq", type=int, default=10, help="curvature interval of TENGraD and K-FAC")
    p.add_argument("--kl-clip", default="default",
                   help="TENGraD kl_clip: 'default' (the optimizer's), 'none', or a number")
    p.add_argument("--methods", default="tengrad,kfac,sgd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join("runs", "robustness"))
    p.add_argument("--quick", action="store_true", help="smoke run: digits, tiny model, one cell per method, 4 steps")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="only merge the robustness.json of several runs (e.g. one process per method) into "
                        "--out: table and heat maps over the union of their grids")
    return p


def merge(args, target: float) -> int:
    results, metas = [], []
    for d in args.merge:
        full = os.path.join(d, "robustness.json")
        if os.path.exists(full):
            with open(full) as f:
                blob = json.load(f)
            results += blob["results"]
            metas += blob["meta"] if isinstance(blob["meta"], list) else [blob["meta"]]
        else:    # a run stopped before its last cell: its finished cells (partial.json), reported as such
            with open(os.path.join(d, "partial.json")) as f:
                part = json.load(f)["results"]
            results += part
            print(f"  {d}: stopped early, {len(part)} finished cells from partial.json")
    grid = [r for r in results if r["method"] in ("tengrad", "kfac")]
    args.lrs = sorted({r["hp"]["lr"] for r in grid})
    args.dampings = sorted({r["hp"]["damping"] for r in grid})
    m = metas[0] if metas else dict(width=args.width, dataset=args.dataset, train=args.train, epochs=args.epochs,
                                    batch=args.batch, update_freq=args.update_freq)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "robustness.json"), "w") as f:
        json.dump(dict(meta=metas, results=results), f, indent=1)
    title = (f"3C1F-{m['width']}, {m['dataset']} {m['train']} images, {m['epochs']:g} epochs, batch {m['batch']}, "
             f"curvature every {m['update_freq']} steps")
    png = heatmaps(results, args, os.path.join(args.out, "robustness.png"), target, title)
    print(title)
    for x in metas:
        print(f"  part: {x['threads']} thread(s), {x['total_seconds']:.0f} s, load at end {x['load_end']}")
    seen, dup = set(), 0
    for r in results:
        key = (r["method"], json.dumps(r["hp"], sort_keys=True))
        dup += key in seen
        seen.add(key)
    if dup:
        raise SystemExit(f"{dup} cells appear in more than one merged run")
    print(table(results, args, target))
    print(f"\nWrote {png}")
    return 0


def tengrad_hp(args, lr: float, damping: float) -> dict:
    # the paper's step (prior=None): this grid's lr and damping are its scale (the defaults' rule: tta.py)
    hp = dict(lr=lr, damping=damping, update_freq=args.update_freq, prior=None)
    if args.kl_clip != "default":
        hp["kl_clip"] = None if args.kl_clip.lower() == "none" else float(args.kl_clip)
    return hp


def cells(args) -> list[tuple[str, dict]]:
    out = []
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for meth in methods:
        if meth == "sgd":
            out += [("sgd", dict(lr=lr)) for lr in args.sgd_lrs]
        elif meth in ("tengrad", "kfac"):
            for d in args.dampings:
                for lr in args.lrs:
                    hp = tengrad_hp(args, lr, d) if meth == "tengrad" else dict(lr=lr, damping=d,
                                                                                 update_freq=args.update_freq)
                    out.append((meth, hp))
        else:
            raise SystemExit(f"unknown method {meth!r}")
    return out


def collapsed(r: dict) -> bool:
    """Finished without a non-finite loss but ended at chance level (last test accuracy < 20%, e.g. the
    loss blew up and the ReLUs died): a failed run, though not a diverged one."""
    return not r["diverged"] and bool(r["points"]) and r["points"][-1]["test_acc"] < 0.2


def cell_text(r: dict | None, target: float) -> str:
    if r is None:
        return "·"
    acc = f"{100 * r['best_acc']:.1f}" if r["best_acc"] == r["best_acc"] else "-"
    mark = " **x**" if r["diverged"] else (" **c**" if collapsed(r) else "")
    return f"{acc}{mark}" + (" ✓" if r["best_acc"] >= target else "")


def table(results: list[dict], args, target: float) -> str:
    lines = []
    for meth, title in (("tengrad", "TENGraD"), ("kfac", "ASDL K-FAC")):
        rs = [r for r in results if r["method"] == meth]
        if not rs:
            continue
        n_ok = sum(r["best_acc"] >= target for r in rs)
        n_div = sum(bool(r["diverged"]) for r in rs)
        n_col = sum(collapsed(r) for r in rs)
        lines.append(f"\n{title}: best test accuracy (%) per cell; rows damping, columns lr; "
                     f"x = diverged, c = collapsed to chance, ✓ = reached {100 * target:.0f}%. "
                     f"{n_ok}/{len(rs)} cells reach {100 * target:.0f}%, {n_div} diverged, {n_col} collapsed.\n")
        lines.append("| damping \\ lr | " + " | ".join(f"{lr:g}" for lr in args.lrs) + " |")
        lines.append("|---" * (len(args.lrs) + 1) + "|")
        for d in args.dampings:
            row = [cell_text(next((r for r in rs if r["hp"]["lr"] == lr and r["hp"]["damping"] == d), None),
                             target) for lr in args.lrs]
            lines.append(f"| {d:g} | " + " | ".join(row) + " |")
    rs = [r for r in results if r["method"] == "sgd"]
    if rs:
        n_ok = sum(r["best_acc"] >= target for r in rs)
        lines.append(f"\nSGD (momentum 0.9): {n_ok}/{len(rs)} learning rates reach {100 * target:.0f}%.\n")
        lines.append("| lr | " + " | ".join(f"{r['hp']['lr']:g}" for r in rs) + " |")
        lines.append("|---" * (len(rs) + 1) + "|")
        lines.append("| best acc (%) | " + " | ".join(cell_text(r, target) for r in rs) + " |")
    return "\n".join(lines)


def heatmaps(results: list[dict], args, path: str, target: float, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grids = [(m, t) for m, t in (("tengrad", "TENGraD"), ("kfac", "ASDL K-FAC"))
             if any(r["method"] == m for r in results)]
    sgd = [r for r in results if r["method"] == "sgd"]
    n = len(grids) + (1 if sgd else 0)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.2), constrained_layout=True, squeeze=False)
    axes = axes[0]
    for ax, (meth, name) in zip(axes, grids):
        rs = {(r["hp"]["damping"], r["hp"]["lr"]): r for r in results if r["method"] == meth}
        z = np.array([[100 * rs[d, lr]["best_acc"] if (d, lr) in rs else np.nan for lr in args.lrs]
                      for d in args.dampings])
        im = ax.imshow(np.ma.masked_invalid(z), vmin=50, vmax=95, cmap="viridis", origin="lower")
        for i, d in enumerate(args.dampings):
            for j, lr in enumerate(args.lrs):
                r = rs.get((d, lr))
                if r is None:
                    ax.text(j, i, "not run", ha="center", va="center", fontsize=7, color="gray")
                    continue
                txt = f"{z[i, j]:.1f}" + ("\nx" if r["diverged"] else ("\nc" if collapsed(r) else ""))
                ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                        color="white" if z[i, j] < 80 or r["diverged"] else "black")
                if r["best_acc"] >= target:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
        ax.set_xticks(range(len(args.lrs)), [f"{v:g}" for v in args.lrs])
        ax.set_yticks(range(len(args.dampings)), [f"{v:g}" for v in args.dampings])
        ax.set(xlabel="lr", ylabel="damping", title=name)
    if sgd:
        ax = axes[-1]
        accs = [100 * r["best_acc"] for r in sgd]
        ax.bar(range(len(sgd)), np.nan_to_num(accs, nan=0.0), color="gray")
        for j, r in enumerate(sgd):
            ax.text(j, max(np.nan_to_num(accs[j], nan=0.0), 50) + 0.5,
                    f"{accs[j]:.1f}" + (" x" if r["diverged"] else (" c" if collapsed(r) else "")), ha="center", fontsize=8)
        ax.axhline(100 * target, color="red", lw=1)
        ax.set_xticks(range(len(sgd)), [f"{r['hp']['lr']:g}" for r in sgd])
        ax.set(xlabel="lr", ylabel="best test accuracy (%)", title="SGD (momentum 0.9)", ylim=(50, 95))
    fig.colorbar(im, ax=list(axes[:len(grids)]), shrink=0.8, label="best test accuracy (%)") if grids else None
    fig.suptitle(title + f" (red box: reached {100 * target:.0f}%; x diverged, c collapsed to chance)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    target = 0.85
    if args.merge:
        return merge(args, target)
    if args.quick:
        args.dataset, args.train, args.test, args.epochs = "digits", 256, 128, 0.5
        args.width, args.hidden, args.batch = 4, 16, 32
        args.lrs, args.dampings, args.sgd_lrs, args.update_freq = [0.3], [1.0], [0.1], 2
        args.evals_per_epoch = 2
    torch.set_num_threads(args.threads)
    name, data = load_data(args.dataset, args.train, args.test, args.seed)
    os.makedirs(args.out, exist_ok=True)
    print(f"{name}: {len(data[1])} train / {len(data[3])} test; 3C1F width {args.width}; batch {args.batch}; "
          f"{args.epochs:g} epoch(s); {torch.get_num_threads()} threads; load {load_average()}", flush=True)
    results = []
    t0 = time.perf_counter()
    skipped = {}
    for meth, hp in cells(args):
        if meth in skipped:
            continue
        r = Run(f"{meth} {hp}", meth, hp, data, epochs=args.epochs, seed=args.seed, batch=args.batch,
                width=args.width, hidden=args.hidden, evals_per_epoch=args.evals_per_epoch)
        if r.not_run:       # a missing package: the method's cells are left out, not counted as diverged
            skipped[meth] = r.not_run
            print(f"  {meth:<8} {r.not_run}", flush=True)
            continue
        while not r.done:
            r.advance()
        s = r.summary()
        results.append(s)
        print(f"  {meth:<8} {json.dumps(hp):<60} best {100 * s['best_acc']:5.1f}% "
              f"{s['seconds']:6.1f} s {s['diverged']}", flush=True)
        with open(os.path.join(args.out, "partial.json"), "w") as f:   # every finished cell survives a kill
            json.dump(dict(results=results), f)
    meta = dict(dataset=name, train=len(data[1]), test=len(data[3]), epochs=args.epochs, width=args.width,
                hidden=args.hidden, batch=args.batch, update_freq=args.update_freq, kl_clip=args.kl_clip,
                threads=torch.get_num_threads(), load_end=load_average(), not_run=skipped,
                total_seconds=time.perf_counter() - t0)
    with open(os.path.join(args.out, "robustness.json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    title = (f"3C1F-{args.width}, {name} {len(data[1])} images, {args.epochs:g} epoch, batch {args.batch}, "
             f"curvature every {args.update_freq} steps")
    png = heatmaps(results, args, os.path.join(args.out, "robustness.png"), target, title)
    print(table(results, args, target))
    print(f"\nWrote {png}; total {meta['total_seconds']:.0f} s; load {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
