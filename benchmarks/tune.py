"""Tuning by the paper's protocol (Appendix A.4.1, with a short budget): every cell of a method's grid
(``task.grids[method]``, the hyperparameters' value lists crossed) trains from the same initial weights on
the same batches (seed 0) for ``task.tune_steps`` steps, alone (timing plays no part); the cell with the
best value of the task's target metric at any evaluation wins (ties: the earlier cell). Diverged cells
never win.

Cells are written, as they finish, to a tuning file (``{"results": [run summaries]}``, the format of
``robustness.py``'s JSON, whose 3C1F cells ``tta.py --task 3c1f`` can read as well), so a later run with
the same file reuses them instead of training again.
"""
from __future__ import annotations

import itertools
import json
import os

from task_run import TaskRun


def grid_cells(grid: dict) -> list[dict]:
    """The cells of ``{name: [values]}``: every combination, the last name varying fastest."""
    names = list(grid)
    return [dict(zip(names, vals)) for vals in itertools.product(*(grid[n] for n in names))]


def score(r: dict) -> float:
    """A cell's best target-metric value (``best``; ``best_acc`` in robustness.py's files)."""
    return r.get("best", r.get("best_acc", float("nan")))


def belongs(r: dict, method: str) -> bool:
    """Whether the tuning cell ``r`` is one of ``method``'s: TENGraD's defaults arm only takes cells that
    change nothing but weight_decay; its tuned arm takes its own cells and robustness.py's TENGraD
    cells (lr x damping)."""
    extra = set(r["hp"]) - {"weight_decay"}
    if method == "tengrad":
        return r["method"] == "tengrad" and not extra
    if method == "tengrad-tuned":
        return r["method"] == "tengrad-tuned" or (r["method"] == "tengrad" and bool(extra))
    return r["method"] == method


def pick(task, results: list[dict], method: str) -> tuple[dict, str] | None:
    """The winning cell's hp and a note, or None when ``results`` hold no finished cell of ``method``."""
    results = [r for r in results if belongs(r, method)]
    cells = [r for r in results if not r["diverged"] and not r.get("not_run")]
    if not cells:
        return None
    best = cells[0]
    for r in cells[1:]:
        if task.better(score(r), score(best)):
            best = r
    n_div = sum(1 for r in results if r["diverged"])
    return dict(best["hp"]), (f"best of {len(cells)} cells ({n_div} diverged) after "
                              f"{best.get('steps', '?')} steps: {task.metric} {task.fmt(score(best))}")


def read(paths: list[str]) -> list[dict]:
    out = []
    for p in paths:
        if p and os.path.exists(p):
            with open(p) as f:
                out += json.load(f)["results"]
    return out


def run_grid(task, data, method: str, grid: dict, steps: int, path: str, seed: int = 0, log=print) -> list[dict]:
    """Train every cell of ``grid`` for ``steps`` steps; append each finished cell to the file ``path``."""
    done = read([path])
    out = []
    for hp in grid_cells(grid):
        r = TaskRun(f"{method} {hp}", method, hp, task, data, steps=steps, seed=seed)
        while not r.done:
            r.advance()
        s = r.summary()
        if r.not_run:
            log(f"  tune {method}: {r.not_run}")
            return [s]
        out.append(s)
        done.append(s)
        with open(path + ".tmp", "w") as f:
            json.dump(dict(task=task.name, results=done), f, indent=1)
        os.replace(path + ".tmp", path)
        log(f"  tune {method:<14} {json.dumps(hp):<48} best {task.metric} {task.fmt(s['best'])} "
            f"{s['seconds']:6.1f} s {s['diverged']}")
    return out


def tuned_point(task, data, method: str, sources: list[str], path: str, tune: bool, log=print) -> tuple[dict, str]:
    """The hp ``method`` runs at: the best cell found in ``sources`` (then ``path``); else, with ``tune``,
    the best cell of a fresh grid run (written to ``path``); else the task's fallback point."""
    found = pick(task, [r for r in read(sources + [path]) if r.get("metric", "test_acc") == task.metric], method)
    if found:
        return found
    grid = task.grids.get(method)
    if tune and grid:
        res = run_grid(task, data, method, grid, task.tune_steps, path, log=log)
        if res and res[0].get("not_run"):
            return dict(task.fallback.get(method, {})), res[0]["not_run"]
        found = pick(task, res, method)
        if found:
            return found
        return dict(task.fallback.get(method, {})), "every tuning cell diverged: the fallback point"
    return dict(task.fallback.get(method, {})), "fallback point (not tuned)"
