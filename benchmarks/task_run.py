"""One training run of a task (tasks/base.py) with one method (peers.py): the harness of ``tta.py``,
``tune.py`` and ``robustness_lm.py``.

The model's initial weights come from ``seed`` (the same for every method) and so do the batches
(``task.batches(data, seed)``). ``advance()`` does one training step and adds its wall time to
``seconds``; every ``task.eval_every`` steps (and after the last) the task's evaluation runs outside the
clock and adds a point. Runs of several methods advanced in turn (``round_robin``) share the load of a
shared machine.

A run *diverges* when its minibatch loss is not finite or its optimizer raises (or refuses its
hyperparameters): it stops and keeps the reason. A method whose package is missing is *not run*
(``not_run`` holds why). No exception escapes.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from peers import NotRun, make_step
from runner import round_robin, timed_step  # noqa: F401 - round_robin serves TaskRun too
from tasks.base import schedule_factor


@dataclass
class TaskRun:
    label: str
    method: str
    hp: dict
    task: object
    data: object
    steps: int
    seed: int = 0
    eval_every: int = 0                  # 0: the task's
    points: list = field(default_factory=list)
    seconds: float = 0.0
    n: int = 0
    diverged: str = ""
    not_run: str = ""

    def __post_init__(self):
        self.eval_every = self.eval_every or self.task.eval_every
        torch.manual_seed(self.seed)
        self.model = self.task.model()
        self.batches = self.task.batches(self.data, self.seed)
        self._loss_sum, self._loss_n = 0.0, 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self.step_fn, self.opt = make_step(self.method, self.model, self.hp, self.task.loss,
                                                   self.task.settings.get("batch"))
            except NotRun as exc:
                self.not_run = str(exc)
            except Exception as exc:  # noqa: BLE001 - a configuration the optimizer refuses is reported
                self.diverged = f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        self.sched = None
        if not (self.not_run or self.diverged):
            if self.task.schedule is not None:      # every method alike (tasks/base.py schedule_factor)
                self.sched = torch.optim.lr_scheduler.LambdaLR(
                    self.opt, lambda n: schedule_factor(self.task.schedule, n, self.steps))
            self._point(float("nan"))

    def _point(self, train_loss: float) -> None:
        metrics = self.task.evaluate(self.model, self.data)
        self.points.append(dict(step=self.n, epoch=round(self.n / self.task.steps_per_epoch, 4),
                                seconds=self.seconds, train_loss=train_loss, **metrics))

    @property
    def done(self) -> bool:
        return bool(self.not_run or self.diverged) or self.n >= self.steps

    def advance(self) -> None:
        if self.done:
            return
        x, y = next(self.batches)
        lv, why, seconds = timed_step(self.step_fn, x, y)
        self.seconds += seconds
        self.n += 1
        if why:
            self.diverged = f"step {self.n}: {why}"
            return
        if self.sched is not None:
            self.sched.step()
        self._loss_sum += lv
        self._loss_n += 1
        if self.n % self.eval_every == 0 or self.n == self.steps:
            self._point(self._loss_sum / max(1, self._loss_n))
            self._loss_sum, self._loss_n = 0.0, 0

    def best(self) -> float:
        """The best value of the task's target metric so far (NaN: no point)."""
        vals = [p[self.task.metric] for p in self.points]
        best = float("nan")
        for v in vals:
            if self.task.better(v, best):
                best = v
        return best

    def time_to(self, target: float) -> float | None:
        """Training seconds at the first evaluation that meets ``target`` (None: never)."""
        return next((p["seconds"] for p in self.points if self.task.reached(p[self.task.metric], target)), None)

    def summary(self) -> dict:
        out = dict(label=self.label, method=self.method, hp=self.hp, seed=self.seed, steps=self.n,
                   seconds=self.seconds, diverged=self.diverged, not_run=self.not_run,
                   metric=self.task.metric, best=self.best(), points=self.points)
        if self.task.metric == "test_acc":
            out["best_acc"] = out["best"]        # the field robustness.json's readers know
        return out
