"""Data for ``tengrad demo``: Fashion-MNIST from Debian's ``dataset-fashion-mnist``, else sklearn digits.

Both come back as float32 tensors ``x: (n, 1, 28, 28)`` (standardised) and int64 labels ``y: (n,)``.
Neither path downloads anything; torchvision is not needed.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_HINT = (
    "To train on Fashion-MNIST instead (as in the paper): on Debian/Ubuntu run "
    "`sudo apt-get install dataset-fashion-mnist` (installs the idx files under "
    f"{FASHION_DIR}), or point --data-dir at a folder holding "
    + ", ".join(sum(FASHION_FILES.values(), ()))
    + "."
)


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    note: str = ""

    def describe(self) -> str:
        return (f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test images, "
                f"{tuple(self.x_train.shape[1:])}")


def _read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic = 0,0,dtype,ndim; big-endian int32 dims; data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4]!r})")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


def fashion_available(data_dir: str = FASHION_DIR) -> bool:
    return all(os.path.exists(os.path.join(data_dir, f)) for f in sum(FASHION_FILES.values(), ()))


def load_fashion(data_dir: str = FASHION_DIR) -> Dataset:
    parts = {}
    for split, (img, lab) in FASHION_FILES.items():
        x = _read_idx(os.path.join(data_dir, img)).astype(np.float32) / 255.0
        y = _read_idx(os.path.join(data_dir, lab)).astype(np.int64)
        parts[split] = (torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y))
    mean, std = parts["train"][0].mean(), parts["train"][0].std()
    (xtr, ytr), (xte, yte) = parts["train"], parts["test"]
    return Dataset("fashion-mnist", (xtr - mean) / std, ytr, (xte - mean) / std, yte,
                   note=f"read from {data_dir}")


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """sklearn's bundled 8x8 digits (1797 images), bilinearly resized to 28x28 with torch."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # (n, 1, 8, 8)
    # 8x8 -> 24x24 (x3), then pad 2 each side -> 28x28, like MNIST's centred 20x20 digits in 28x28.
    x = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    x = F.pad(x, (2, 2, 2, 2))
    y = torch.from_numpy(d.target.astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return Dataset("digits", x[tr], y[tr], x[te], y[te], note="scikit-learn's bundled 8x8 digits, resized to 28x28")


def load(name: str = "auto", data_dir: str = FASHION_DIR, seed: int = 0) -> Dataset:
    """``name``: "auto" (Fashion-MNIST when present, else digits), "fashion-mnist" or "digits".

    A missing Fashion-MNIST never raises: it falls back to digits and says so in ``Dataset.note``.
    """
    if name not in ("auto", "fashion-mnist", "digits"):
        raise ValueError(f"unknown dataset {name!r}; choose auto, fashion-mnist or digits")
    if name in ("auto", "fashion-mnist"):
        if fashion_available(data_dir):
            return load_fashion(data_dir)
        ds = load_digits(seed=seed)
        why = f"Fashion-MNIST not found under {data_dir}; using scikit-learn's digits instead"
        return Dataset(ds.name, ds.x_train, ds.y_train, ds.x_test, ds.y_test, note=why)
    return load_digits(seed=seed)


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of size ``n`` (all of it when ``n`` is None, 0 or too large)."""
    if not n or n >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]
