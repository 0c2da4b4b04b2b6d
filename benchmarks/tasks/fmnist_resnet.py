"""A BatchNorm WideResNet on Fashion-MNIST: WRN-16 (three groups of two pre-activation basic blocks, a
1x1 projection where the shape changes) with channels (w, 2w, 4w), w = 12 by default: WRN-16-4's layout
(64/128/256 channels) narrowed so that an epoch of 60,000 28x28 images takes minutes on 2 cores.
Targets: 90% and 92% test accuracy on Fashion-MNIST's fixed test set."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import images
from .base import Task


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the input (or its 1x1 projection)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.proj = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        h = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return out + (x if self.proj is None else self.proj(h))


class WideResNet(nn.Module):
    """WRN-(6n+4) with channels (w, 2w, 4w) at strides (1, 2, 2): [m, 1, 28, 28] -> [m, classes]."""

    def __init__(self, width: int = 16, blocks: int = 2, classes: int = 10):
        super().__init__()
        chans = (width, 2 * width, 4 * width)
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        layers, cin = [], width
        for i, c in enumerate(chans):
            for b in range(blocks):
                layers.append(PreActBlock(cin, c, stride=2 if (i > 0 and b == 0) else 1))
                cin = c
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        h = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.head(h.mean((2, 3)))


def task(quick: bool = False, dataset: str = "fashion-mnist", train: int = 0, test: int = 0,
         batch: int = 128, width: int = 12, epochs: float = 4.0, evals_per_epoch: int = 4,
         eval_every: int = 0, steps: int = 0, schedule: str = "cosine") -> Task:
    """The task; ``steps`` > 0 overrides ``epochs``, ``eval_every`` > 0 overrides ``evals_per_epoch``;
    ``schedule``: the learning rate over the run for every method ("cosine" to zero, as WRN recipes
    train; "none": constant, as the first data point in benchmarks/README.md was run)."""
    blocks = 2
    if quick:
        dataset, train, test, batch, width, blocks, epochs, evals_per_epoch = "digits", 256, 128, 32, 4, 1, 0.5, 2
    name, data = images.load(dataset, train, test)
    per_epoch = len(data[1]) // batch
    every = eval_every or max(1, per_epoch // max(1, evals_per_epoch))
    wd = [5e-4, 5e-3]
    return Task(
        name="resnet",
        title=f"WRN-{6 * blocks + 4} ({width}/{2 * width}/{4 * width} channels, BatchNorm) on {name} "
              f"({len(data[1])}/{len(data[3])}), batch {batch}",
        load=lambda: data,
        model=lambda: WideResNet(width, blocks),
        batches=lambda d, seed: images.batches(d, seed, batch),
        loss=images.loss,
        evaluate=images.evaluate,
        metric="test_acc", higher_is_better=True,
        targets=(0.90, 0.92),
        steps=steps or max(1, int(round(epochs * per_epoch))), eval_every=every, steps_per_epoch=per_epoch,
        tune_steps=max(2, per_epoch // 4) if not quick else 2,
        grids=dict(
            sgd=dict(lr=[0.03, 0.1, 0.3], weight_decay=wd),
            adamw=dict(lr=[1e-3, 3e-3, 1e-2], weight_decay=[0.01, 0.1]),
            soap=dict(lr=[1e-3, 3e-3, 1e-2], weight_decay=[0.01, 0.1]),
            kfac=dict(lr=[0.01, 0.03, 0.1], damping=[0.01, 0.1, 1.0]),
            tengrad=dict(weight_decay=[0.0] + wd), **{"tengrad-prior": dict(weight_decay=[0.0] + wd)},
            **{"tengrad-natural": dict(weight_decay=[0.0] + wd)},
            **{"tengrad-soap": dict(lr=[0.3, 1.0], weight_decay=[0.0] + wd)},
            **{"tengrad-tuned": dict(lr=[1e-3, 3e-3, 6e-3], damping=[0.03, 0.1, 0.3])}),
        fallback=dict(sgd=dict(lr=0.1, weight_decay=5e-4), adamw=dict(lr=3e-3, weight_decay=0.1),
                      soap=dict(lr=3e-3, weight_decay=0.1), kfac=dict(lr=0.03, damping=0.1), tengrad={},
                      **{"tengrad-tuned": {}, "tengrad-natural": {}, "tengrad-prior": {},
                         "tengrad-soap": dict(lr=1.0)}),
        acceptance=dict(target=0.92, ratio=0.7, peers=["sgd", "adamw", "soap", "kfac"]),
        settings=dict(dataset=name, train=len(data[1]), test=len(data[3]), batch=batch, width=width,
                      blocks=blocks, epochs=epochs, eval_every=every, schedule=schedule),
        schedule=None if schedule == "none" else schedule,
    )
