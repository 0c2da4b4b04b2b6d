"""``tengrad demo``: the paper's 3C1F network on Fashion-MNIST, SGD and TENGraD side by side.

Trains the same initial network on the same batches with each optimizer, writes ``results.csv``
(optimizer, epoch, wall time, train loss, test accuracy) and ``curves.png`` (training loss and test
accuracy against epoch and against wall time: the paper's Figures 4 and 5) under ``--out``, and
prints a final table. Without Fashion-MNIST it falls back to scikit-learn's digits and says so.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

__all__ = ["main", "build_parser"]

OPTIMIZERS = ("sgd", "tengrad")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tengrad demo",
        description="Train the paper's 3C1F network with SGD and TENGraD side by side (Figures 4 and 5).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=("auto", "fashion-mnist", "digits"), default="auto",
                   help="auto: Fashion-MNIST when installed, else scikit-learn's digits")
    d.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx .gz files "
                   "(default: /usr/share/datasets/fashion-mnist)")
    d.add_argument("--train-subset", type=int, default=10000, help="training images used (0: all)")
    d.add_argument("--test-subset", type=int, default=2000, help="test images used (0: all)")
    m = p.add_argument_group("model (paper: width 128, hidden 500)")
    m.add_argument("--width", type=int, default=32, help="channels of the three convolutions")
    m.add_argument("--hidden", type=int, default=500, help="units of the first fully connected layer")
    t = p.add_argument_group("training")
    t.add_argument("--optimizers", default="sgd,tengrad", help="comma-separated subset of " + ",".join(OPTIMIZERS))
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--evals-per-epoch", type=int, default=2, help="test evaluations (curve points) per epoch")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--momentum", type=float, default=0.9, help="SGD's momentum")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--sgd-lr", type=float, default=0.05)
    t.add_argument("--prior", choices=("soap", "adam", "none"), default="soap",
                   help="TENGraD prior: 'soap' (the default, with SOAP's step around the rows), 'adam', or 'none' "
                        "(the paper's step)")
    t.add_argument("--tengrad-lr", type=float, default=None,
                   help="TENGraD lr (default: TENGraD's, 3e-3; 0.3 with --prior none)")
    t.add_argument("--tengrad-damping", type=float, default=None,
                   help="TENGraD damping (default: TENGraD's, 0.1; 1 with --prior none)")
    t.add_argument("--tengrad-momentum", type=float, default=None,
                   help="TENGraD momentum (default: TENGraD's, 0.95; 0.9 with --prior none)")
    t.add_argument("--update-freq", type=int, default=None,
                   help="TENGraD curvature update interval in steps (default: TENGraD's, 10)")
    t.add_argument("--kl-clip", default=None,
                   help="TENGraD KL clip: a number, or 'none' for the exact step (default: TENGraD's: none; "
                        "6.4e-3 with --prior other than soap)")
    t.add_argument("--fisher", choices=("empirical", "mc", "exact"), default="empirical", help="TENGraD Fisher")
    t.add_argument("--backend", default="auto", help="TENGraD backend")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=os.path.join("runs", "demo"), help="output folder")
    o.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    p.add_argument("--distributed", action="store_true", help="data-parallel on torch.distributed (gloo, "
                   "run under torchrun): SGD and TENGraD 'exact' on DDP, one table (demo/distributed.py)")
    return p


def tengrad_kwargs(args) -> dict:
    """Only the TENGraD settings the user gave (prior, lr, damping, momentum, update_freq, kl_clip):
    everything else is TENGraD(model)'s defaults (those of the prior's step rule)."""
    given = dict(lr=args.tengrad_lr, damping=args.tengrad_damping, momentum=getattr(args, "tengrad_momentum", None),
                 update_freq=args.update_freq)
    kw = {k: v for k, v in given.items() if v is not None}
    prior = getattr(args, "prior", "soap")
    if prior != "soap":
        kw["prior"] = None if prior == "none" else prior
    if getattr(args, "kl_clip", None) is not None:
        kw["kl_clip"] = None if str(args.kl_clip).lower() == "none" else float(args.kl_clip)
    return kw


def _make_optimizer(name: str, model, args):
    import torch

    if name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.sgd_lr, momentum=args.momentum,
                              weight_decay=args.weight_decay)
        return "SGD", opt, f"lr={args.sgd_lr:g}"
    from tengrad import TENGraD

    kw = tengrad_kwargs(args)
    opt = TENGraD(model, weight_decay=args.weight_decay, fisher=args.fisher, backend=args.backend, **kw)
    g = opt.param_groups[0]
    settings = (f"prior={opt.prior}, step_rule={opt.step_rule}, lr={g['lr']:g}, damping={g['damping']:g}, "
                f"momentum={g['momentum']:g}, update_freq={opt.update_freq}, kl_clip={opt.kl_clip}"
                + ("" if kw else " (defaults)"))
    return "TENGraD", opt, settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.distributed:
        from .distributed import main_distributed
        return main_distributed(args)
    names = [n.strip().lower() for n in args.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or not names:
        print(f"tengrad demo: unknown optimizer(s) {bad}; choose from {', '.join(OPTIMIZERS)}", file=sys.stderr)
        return 2

    missing = [m for m in ("matplotlib", "tqdm") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"tengrad demo needs {', '.join(missing)}: pip install 'tengrad[demo]'", file=sys.stderr)
        return 1

    import torch

    from . import data as data_mod
    from .model import three_c_one_f
    from .report import ensure_dir, plot, table, write_csv
    from .train import train

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        ds = data_mod.load(args.dataset, args.data_dir or data_mod.FASHION_DIR, seed=args.seed)
    except ImportError as exc:  # the digits fallback needs scikit-learn
        print(f"tengrad demo: Fashion-MNIST is not available and the digits fallback needs scikit-learn "
              f"({exc}). {data_mod.FASHION_HINT} Or: pip install 'tengrad[demo]'", file=sys.stderr)
        return 1
    print(f"Data set: {ds.describe()}" + (f" ({ds.note})" if ds.note else ""))
    if ds.name != "fashion-mnist" and args.dataset != "digits":
        print(data_mod.FASHION_HINT)
    x_tr, y_tr = data_mod.subset(ds.x_train, ds.y_train, args.train_subset, args.seed)
    x_te, y_te = data_mod.subset(ds.x_test, ds.y_test, args.test_subset, args.seed + 1)
    batch = min(args.batch_size, len(y_tr))
    print(f"Using {len(y_tr)} training and {len(y_te)} test images; batch {batch}; "
          f"3C1F width {args.width}, hidden {args.hidden}; {args.epochs} epoch(s); "
          f"{torch.get_num_threads()} CPU thread(s)")

    results, settings = [], {}
    t_start = time.perf_counter()
    for name in names:
        torch.manual_seed(args.seed)  # same initial weights for every optimizer
        model = three_c_one_f(width=args.width, hidden=args.hidden)
        label, opt, desc = _make_optimizer(name, model, args)
        settings[label] = desc
        res = train(label, model, opt, x_tr, y_tr, x_te, y_te, epochs=args.epochs, batch_size=batch,
                    seed=args.seed, evals_per_epoch=args.evals_per_epoch,
                    progress=not args.no_progress)
        if res.diverged:
            print(f"WARNING: {label} diverged (non-finite loss) at step {res.steps}; "
                  "try a smaller learning rate or a larger damping.", file=sys.stderr)
        results.append(res)

    out = ensure_dir(args.out)
    csv_path = write_csv(results, os.path.join(out, "results.csv"))
    title = (f"3C1F (width {args.width}) on {ds.name}, {len(y_tr)} train images, batch {batch}")
    png_path = plot(results, os.path.join(out, "curves.png"), title=title)
    print()
    print(table(results, settings))
    print(f"\nTotal time {time.perf_counter() - t_start:.1f} s. Wrote {csv_path} and {png_path}")
    return 0
