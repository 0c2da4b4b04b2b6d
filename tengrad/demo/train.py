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
    epoch: int
    wall_time: float  # seconds of training (optimizer steps incl. forward/backward), evaluation excluded
    train_loss: float  # mean minibatch loss over the epoch (epoch 0: loss of the initial model)
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
          progress: bool = True) -> RunResult:
    """Plain minibatch training: ``zero_grad(); cross_entropy(model(x), y).backward(); step()``.

    The data order depends on ``seed`` only, so every optimizer sees the same batches. The last
    incomplete batch is dropped (every step uses exactly ``batch_size`` samples). Training stops
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
    gen = torch.Generator().manual_seed(seed)
    wall = 0.0
    bar = tqdm(total=epochs * steps_per_epoch, desc=f"{name:>8}", unit="step", disable=not progress,
               leave=True, dynamic_ncols=True)
    model.train()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(y_train), generator=gen)
        total = 0.0
        t0 = time.perf_counter()
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            xb, yb = x_train[idx], y_train[idx]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            lv = loss.item()
            total += lv
            result.steps += 1
            bar.update(1)
            if s % 5 == 0:
                bar.set_postfix(epoch=epoch, loss=f"{lv:.3f}")
            if not math.isfinite(lv):
                result.diverged = True
                break
        wall += time.perf_counter() - t0
        _, acc = evaluate(model, x_test, y_test)
        n = s + 1
        result.records.append(Record(name, epoch, wall, total / n, acc))
        bar.set_postfix(epoch=epoch, loss=f"{total / n:.3f}", test_acc=f"{acc:.3f}")
        if result.diverged:
            break
    bar.close()
    return result
