"""Train one model with one optimizer and record the curves the paper plots (Figures 4 and 5)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Record:
    optimizer: str
    epoch: float  # fractional when evaluating more than once per epoch (steps done / steps per epoch)
    wall_time: float  # seconds of training (optimizer steps incl. forward/backward), evaluation excluded
    train_loss: float  # mean minibatch loss since the previous record (epoch 0: loss of the initial model)
    test_accuracy: float


@dataclass
class RunResult:
    optimizer: str
    records: list[Record] = field(default_factory=list)
    steps: int = 0
    diverged: bool = False

    @property
    def time_per_step(self) -> float:
        return self.records[-1].wall_time / self.steps if self.steps else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y)."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        out = model(x[i:i + batch_size])
        loss += F.cross_entropy(out, y[i:i + batch_size], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + batch_size]).sum().item()
    model.train(was_training)
    return loss / len(y), correct / len(y)


def train(name: str, model: nn.Module, optimizer, x_train: torch.Tensor, y_train: torch.Tensor,
          x_test: torch.Tensor, y_test: torch.Tensor, *, epochs: int, batch_size: int, seed: int,
          evals_per_epoch: int = 1, progress: bool = True) -> RunResult:
    """Plain minibatch training: ``zero_grad(); cross_entropy(model(x), y).backward(); step()``
    (``opt.backward(model(x), y)`` instead of ``.backward()`` for TENGraD's "mc" and "exact" Fishers).

    The data order depends on ``seed`` only, so every optimizer sees the same batches. The last
    incomplete batch is dropped (every step uses exactly ``batch_size`` samples). The test set is
    evaluated ``evals_per_epoch`` times per epoch (outside the timed region). Training stops
    early, with ``diverged=True``, if the loss becomes non-finite.
    """
    from tqdm.auto import tqdm

    result = RunResult(name)
    loss0, _ = evaluate(model, x_train, y_train)
    _, acc0 = evaluate(model, x_test, y_test)
    result.records.append(Record(name, 0, 0.0, loss0, acc0))

    steps_per_epoch = len(y_train) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the training set ({len(y_train)} samples)")
    evals_per_epoch = max(1, min(evals_per_epoch, steps_per_epoch))
    checkpoints = {round(steps_per_epoch * j / evals_per_epoch) for j in range(1, evals_per_epoch + 1)}
    gen = torch.Generator().manual_seed(seed)
    wall = 0.0
    bar = tqdm(total=epochs * steps_per_epoch, desc=f"{name:>8}", unit="step", disable=not progress,
               leave=True, dynamic_ncols=True)
    uses_opt_backward = getattr(optimizer, "fisher", "empirical") != "empirical" and hasattr(optimizer, "backward")
    model.train()
    total, count = 0.0, 0
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(y_train), generator=gen)
        t0 = time.perf_counter()
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            xb, yb = x_train[idx], y_train[idx]
            optimizer.zero_grad()
            if uses_opt_backward:  # TENGraD with a Monte-Carlo or exact Fisher: its own backward passes
                loss = optimizer.backward(model(xb), yb, loss="cross_entropy")
            else:
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
            lv = loss.item()
            if math.isfinite(lv):
                try:
                    optimizer.step()
                except Exception as exc:  # TENGraD refuses non-finite gradients or directions
                    if "finite" not in str(exc):
                        raise
                    result.diverged, lv = True, float("nan")
            else:
                result.diverged = True
            total, count = total + lv, count + 1
            result.steps += 1
            bar.update(1)
            if s + 1 in checkpoints or result.diverged:
                wall += time.perf_counter() - t0
                _, acc = evaluate(model, x_test, y_test)
                ep = epoch - 1 + (s + 1) / steps_per_epoch
                result.records.append(Record(name, round(ep, 4), wall, total / count, acc))
                bar.set_postfix(epoch=f"{ep:.2f}", loss=f"{total / count:.3f}", test_acc=f"{acc:.3f}")
                total, count = 0.0, 0
                if result.diverged:
                    break
                t0 = time.perf_counter()
        if result.diverged:
            break
    bar.close()
    return result
