"""A byte-level text corpus every machine has: the ``.py`` source of Python's standard library
(``sysconfig.get_paths()["stdlib"]``; ``site-packages``, ``dist-packages`` and ``__pycache__`` left out).

The split is by file and deterministic: the files are sorted by their path relative to the library's
root, and a file is in the validation set when the first 8 hex digits of the SHA-1 of that relative path,
read as an integer, are below ``val_fraction`` of 16^8. Each split is its files' bytes concatenated in
sorted order, each file followed by a newline. The corpus differs between Python versions: the meta
records the version, the file counts and the byte counts.
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig

import torch

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def source_files(root: str) -> list[str]:
    """The ``.py`` files under ``root`` as sorted paths relative to it."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
        out += [os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(".py")]
    return sorted(out)


def is_validation(relpath: str, val_fraction: float) -> bool:
    h = int(hashlib.sha1(relpath.encode()).hexdigest()[:8], 16)
    return h < val_fraction * 16 ** 8


def load(root: str | None = None, val_fraction: float = 0.1, max_bytes: int = 0):
    """(train, val, meta): two uint8 tensors of bytes and a dict describing them. ``max_bytes`` > 0 keeps
    only the first files of each split up to that many bytes (smoke runs)."""
    root = root or sysconfig.get_paths()["stdlib"]
    parts = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    counts = {"train": 0, "val": 0}
    for rel in source_files(root):
        split = "val" if is_validation(rel, val_fraction) else "train"
        cap = max_bytes if split == "train" else max(1, max_bytes // 4)
        if max_bytes and sizes[split] >= cap:
            continue
        with open(os.path.join(root, rel), "rb") as f:
            blob = f.read() + b"\n"
        parts[split].append(blob)
        sizes[split] += len(blob)
        counts[split] += 1
    train, val = (torch.frombuffer(bytearray(b"".join(parts[s])), dtype=torch.uint8) for s in ("train", "val"))
    meta = dict(root=root, python=sys.version.split()[0], val_fraction=val_fraction,
                train_files=counts["train"], val_files=counts["val"], train_bytes=len(train), val_bytes=len(val))
    return train, val, meta
