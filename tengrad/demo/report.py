"""CSV, the 4-panel figure (loss and test accuracy vs epoch and vs wall time) and the final table."""
from __future__ import annotations

import csv
import os

from .train import RunResult

COLUMNS = ("optimizer", "epoch", "wall_time_s", "train_loss", "test_accuracy")


def write_csv(results: list[RunResult], path: str) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in results:
            for rec in r.records:
                w.writerow((rec.optimizer, f"{rec.epoch:g}", f"{rec.wall_time:.4f}", f"{rec.train_loss:.6g}",
                            f"{rec.test_accuracy:.6g}"))
    return path


def plot(results: list[RunResult], path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), constrained_layout=True)
    for r in results:
        ep = [rec.epoch for rec in r.records]
        wt = [rec.wall_time for rec in r.records]
        loss = [rec.train_loss for rec in r.records]
        acc = [100 * rec.test_accuracy for rec in r.records]
        for ax, xs, ys in ((axes[0, 0], ep, loss), (axes[0, 1], wt, loss),
                           (axes[1, 0], ep, acc), (axes[1, 1], wt, acc)):
            ax.plot(xs, ys, marker="o", ms=3, label=r.optimizer)
    axes[0, 0].set(xlabel="epoch", ylabel="training loss", yscale="log")
    axes[0, 1].set(xlabel="wall time (s)", ylabel="training loss", yscale="log")
    axes[1, 0].set(xlabel="epoch", ylabel="test accuracy (%)")
    axes[1, 1].set(xlabel="wall time (s)", ylabel="test accuracy (%)")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(results: list[RunResult], settings: dict[str, str]) -> str:
    """A markdown table: one row per optimizer with its final numbers."""
    head = ("optimizer", "settings", "final train loss", "final test acc", "best test acc",
            "train time (s)", "ms/step")
    rows = []
    for r in results:
        last = r.records[-1]
        best = max(rec.test_accuracy for rec in r.records)
        note = " (diverged)" if r.diverged else ""
        rows.append((r.optimizer, settings.get(r.optimizer, ""), f"{last.train_loss:.4f}{note}",
                     f"{100 * last.test_accuracy:.2f}%", f"{100 * best:.2f}%", f"{last.wall_time:.1f}",
                     f"{1000 * r.time_per_step:.0f}"))
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    lines = [fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
