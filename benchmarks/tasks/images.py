"""Image classification on Fashion-MNIST (Debian's ``dataset-fashion-mnist``) shared by the 3C1F and
ResNet tasks: the data (a seeded subset of the fixed train/test split), the batches (one permutation per
epoch from the seed, as benchmarks/runner.py draws them) and the evaluation (test loss and accuracy)."""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from tengrad.demo.train import evaluate as _evaluate  # noqa: E402


def load(dataset: str, train: int, test: int):
    """(name, (x_train, y_train, x_test, y_test)); 0 means all images of a split. Fashion-MNIST's own
    train/test split, subsets drawn with seed 0 (train) and 1 (test), as runner.load_data does."""
    from tengrad.demo import data as data_mod

    ds = data_mod.load(dataset, data_mod.FASHION_DIR, seed=0)
    x_tr, y_tr = data_mod.subset(ds.x_train, ds.y_train, train, 0)
    x_te, y_te = data_mod.subset(ds.x_test, ds.y_test, test, 1)
    return ds.name, (x_tr.contiguous(), y_tr, x_te.contiguous(), y_te)


def batches(data, seed: int, batch: int):
    """Endless (x, y) batches: a fresh permutation of the training set per epoch from ``seed``; the last
    incomplete batch of an epoch is dropped."""
    x_tr, y_tr = data[0], data[1]
    per_epoch = len(y_tr) // batch
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(y_tr), generator=gen)
        for s in range(per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            yield x_tr[idx], y_tr[idx]


def loss(out, y):
    return F.cross_entropy(out, y)


def evaluate(model, data) -> dict:
    """Test loss and accuracy on the whole test subset (eval mode: BatchNorm's running statistics)."""
    with torch.no_grad():
        tl, ta = _evaluate(model, data[2], data[3])
    return dict(test_loss=tl, test_acc=ta)
