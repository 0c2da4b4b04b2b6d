"""What a time-to-target task is: its data, its model, its loss, its evaluation, its targets and its grids.

A ``Task`` is plain data plus functions, so the harness (task_run.py, tune.py, tta.py) never asks which
task it runs:

* ``load() -> data``: an opaque object the other functions take (tensors already in memory);
* ``model()``: a fresh model (the caller seeds torch first, so every method starts from the same weights);
* ``batches(data, seed)``: an endless iterator of training batches ``(x, y)``, the same for every method of
  a seed;
* ``loss(out, y)``: the mean-reduced training loss;
* ``evaluate(model, data) -> dict``: the metrics of one evaluation (run outside the clock, in eval mode);
  ``metric`` names the one the targets are about, ``higher_is_better`` its direction;
* ``steps`` (the full run), ``eval_every`` (steps between evaluations), ``steps_per_epoch`` (for the
  epoch axis), ``tune_steps`` (the short budget of one tuning cell);
* ``acceptance``: ``{"target", "ratio", "peers"}``, what tta.py's verdict checks;
* ``grids[method]``: the tuning grid, ``{hyperparameter: [values]}`` crossed; ``fallback[method]``: the
  point used when tuning is skipped (``--no-tune``).
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Callable, Iterator


@dataclass
class Task:
    name: str
    title: str                                   # one line for the report: model, data, batch
    load: Callable[[], object]
    model: Callable[[], object]
    batches: Callable[[object, int], Iterator]
    loss: Callable
    evaluate: Callable[[object, object], dict]
    metric: str
    higher_is_better: bool
    targets: tuple[float, ...]
    steps: int
    eval_every: int
    steps_per_epoch: float
    tune_steps: int
    grids: dict = field(default_factory=dict)
    fallback: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # written into the results JSON (sizes, data, split)
    # the issue-24 acceptance: TENGraD's defaults reach ``target`` in <= ``ratio`` x the time of the
    # fastest of ``peers`` (median over seeds)
    acceptance: dict = field(default_factory=dict)
    # the learning rate over the run, for every method alike: None (constant) or "cosine" (lr_0 times
    # (1 + cos(pi n / steps)) / 2 after step n, ``schedule_factor``)
    schedule: str | None = None

    def reached(self, value: float, target: float) -> bool:
        """Whether ``value`` of the target metric meets ``target`` (NaN never does)."""
        if value != value:
            return False
        return value >= target if self.higher_is_better else value <= target

    def better(self, a: float, b: float) -> bool:
        """Whether metric value ``a`` is strictly better than ``b`` (NaN is worst)."""
        if a != a:
            return False
        if b != b:
            return True
        return a > b if self.higher_is_better else a < b

    def fmt(self, value: float) -> str:
        """A metric value as the report prints it (accuracy in %, bits per byte with 3 decimals)."""
        if value != value:
            return "-"
        return f"{100 * value:.2f}%" if self.metric.endswith("acc") else f"{value:.3f}"


SCHEDULES = (None, "cosine")


def schedule_factor(schedule: str | None, n: int, steps: int) -> float:
    """The learning rate of step n + 1 (n = 0, 1, ...) over the initial one under ``schedule``."""
    if schedule is None:
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(n, steps) / max(1, steps)))
    raise ValueError(f"unknown schedule {schedule!r}; valid: {SCHEDULES}")
