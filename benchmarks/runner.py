"""Training runs shared by ``tta.py`` and ``robustness.py``: SGD, TENGraD and ASDL K-FAC on 3C1F.

A ``Run`` owns one model (initial weights from ``seed``, the same for every method), one optimizer and
the data order (a permutation per epoch from ``seed``: every method sees the same batches). ``advance()``
does one training step and adds its wall time to ``seconds``; evaluations on the test set run outside
the clock. Runs of several methods can be advanced in turn (one step each, round-robin) so that the
load of a shared machine hits all of them alike.

A run *diverges* when its minibatch loss is not finite or its optimizer raises (TENGraD refuses a
non-finite gradient or direction; ASDL's Cholesky may fail): it stops and reports the reason; no
exception escapes. A method whose package is missing (ASDL) is *not run* (``not_run`` says why), not
diverged.

Methods and hyperparameters (``hp``):

* ``sgd``: torch.optim.SGD(lr, momentum=0.9, weight_decay).
* ``tengrad``: ``tengrad.TENGraD(model, **hp)`` (empirical Fisher; an empty hp means its defaults).
* ``kfac``: ASDL 0.1a5 ``KfacGradientMaker`` (empirical Fisher, ``fisher_emp``; damping; curvature and
  inverse every ``update_freq`` steps) feeding torch.optim.SGD(lr, momentum=0.9, weight_decay).
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tengrad.demo.model import three_c_one_f  # noqa: E402
from tengrad.demo.train import evaluate  # noqa: E402

METHODS = ("sgd", "tengrad", "kfac")


@dataclass
class Point:
    epoch: float
    seconds: float        # training time so far (evaluation excluded)
    train_loss: float     # mean minibatch loss since the previous point
    test_loss: float
    test_acc: float


def make_step(method: str, model, hp: dict, batch: int):
    """A function (x, y) -> loss (float) doing one full training step, and the optimizer."""
    hp = dict(hp)
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp.get("momentum", 0.9),
                              weight_decay=hp.get("weight_decay", 0.0))
    elif method == "tengrad":
        import tengrad

        opt = tengrad.TENGraD(model, **hp)
    if method in ("sgd", "tengrad"):
        def step(x, y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            lv = loss.item()
            if math.isfinite(lv):
                opt.step()
            return lv
        return step, opt
    if method == "kfac":
        from asdl import KfacGradientMaker, PreconditioningConfig

        k = int(hp.get("update_freq", 10))
        cfg = PreconditioningConfig(data_size=batch, damping=hp["damping"], preconditioner_upd_interval=k,
                                    curvature_upd_interval=k)
        gm = KfacGradientMaker(model, cfg, fisher_type="fisher_emp")
        opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp.get("momentum", 0.9),
                              weight_decay=hp.get("weight_decay", 0.0))

        def step(x, y):
            opt.zero_grad()
            dummy = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, dummy, y)
            _, loss = gm.forward_and_backward()
            lv = float(loss)
            if math.isfinite(lv):
                opt.step()
            return lv
        return step, opt
    raise ValueError(f"unknown method {method!r}; valid: {METHODS}")


def timed_step(step_fn, x, y, width: int = 160) -> tuple[float, str, float]:
    """(loss, why it failed or "", seconds) of one ``step_fn(x, y)``: any exception or a non-finite loss
    is a divergence (its reason cut to ``width`` characters), never raised."""
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lv = step_fn(x, y)
    except Exception as exc:  # noqa: BLE001 - every failure of a run is reported as divergence
        lv, why = float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:width]}"
    else:
        why = "" if math.isfinite(lv) else "non-finite loss"
    return lv, why, time.perf_counter() - t0


@dataclass
class Run:
    label: str
    method: str
    hp: dict
    data: tuple            # (x_train, y_train, x_test, y_test)
    epochs: float
    seed: int = 0
    batch: int = 128
    width: int = 32
    hidden: int = 500
    evals_per_epoch: int = 4
    stop_at_acc: float | None = None     # stop early once the test accuracy reaches this
    points: list[Point] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    diverged: str = ""                   # empty, or why the run stopped
    not_run: str = ""                    # empty, or why the method could not start (a missing package)

    def __post_init__(self):
        torch.manual_seed(self.seed)
        self.model = three_c_one_f(width=self.width, hidden=self.hidden)
        x_tr, y_tr, _, _ = self.data
        self.per_epoch = len(y_tr) // self.batch
        self.total = max(1, int(round(self.epochs * self.per_epoch)))
        every = max(1, self.per_epoch // max(1, self.evals_per_epoch))
        self.checkpoints = set(range(every, self.total + 1, every)) | {self.total}
        self.gen = torch.Generator().manual_seed(self.seed)
        self.perm = None
        self._loss_sum, self._loss_n = 0.0, 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self.step_fn, self.opt = make_step(self.method, self.model, self.hp, self.batch)
            except ModuleNotFoundError as exc:
                self.not_run = f"not run: {exc}"
            except Exception as exc:  # a configuration the optimizer refuses is reported, not raised
                self.diverged = f"refused: {type(exc).__name__}: {exc}"
        if not (self.diverged or self.not_run):
            tl, ta = evaluate(self.model, *self.data[2:])
            self.points.append(Point(0.0, 0.0, float("nan"), tl, ta))

    @property
    def done(self) -> bool:
        return bool(self.diverged or self.not_run) or self.steps >= self.total or (
            self.stop_at_acc is not None and bool(self.points) and self.points[-1].test_acc >= self.stop_at_acc)

    def advance(self) -> None:
        if self.done:
            return
        x_tr, y_tr, x_te, y_te = self.data
        s = self.steps % self.per_epoch
        if s == 0:
            self.perm = torch.randperm(len(y_tr), generator=self.gen)
        idx = self.perm[s * self.batch:(s + 1) * self.batch]
        lv, why, seconds = timed_step(self.step_fn, x_tr[idx], y_tr[idx], width=120)
        self.seconds += seconds
        self.steps += 1
        if why:
            self.diverged = f"step {self.steps}: {why}"
            return
        self._loss_sum += lv
        self._loss_n += 1
        if self.steps in self.checkpoints:
            tl, ta = evaluate(self.model, x_te, y_te)
            self.points.append(Point(round(self.steps / self.per_epoch, 4), self.seconds,
                                     self._loss_sum / max(1, self._loss_n), tl, ta))
            self._loss_sum, self._loss_n = 0.0, 0

    def best_acc(self) -> float:
        return max((p.test_acc for p in self.points), default=float("nan"))

    def time_to(self, acc: float) -> float | None:
        """Training seconds at the first evaluation with test accuracy >= acc (None: never)."""
        return next((p.seconds for p in self.points if p.test_acc >= acc), None)

    def summary(self) -> dict:
        return dict(label=self.label, method=self.method, hp=self.hp, seed=self.seed, steps=self.steps,
                    seconds=self.seconds, diverged=self.diverged, not_run=self.not_run, best_acc=self.best_acc(),
                    points=[p.__dict__ for p in self.points])


def round_robin(runs: list[Run], on_point=None) -> None:
    """Advance every run one step at a time in turn until all are done; ``on_point()`` is called after
    each round in which some run took an evaluation (e.g. to save partial results)."""
    while not all(r.done for r in runs):
        n = sum(len(r.points) for r in runs)
        for r in runs:
            r.advance()
        if on_point is not None and sum(len(r.points) for r in runs) != n:
            on_point()


def load_data(dataset: str, train: int, test: int, seed: int = 0):
    from tengrad.demo import data as data_mod

    ds = data_mod.load(dataset, data_mod.FASHION_DIR, seed=seed)
    x_tr, y_tr = data_mod.subset(ds.x_train, ds.y_train, train, seed)
    x_te, y_te = data_mod.subset(ds.x_test, ds.y_test, test, seed + 1)
    return ds.name, (x_tr.contiguous(), y_tr, x_te.contiguous(), y_te)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())
