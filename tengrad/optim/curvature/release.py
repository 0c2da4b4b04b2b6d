"""Handing the memory a curvature step frees back to the operating system (CPU, glibc).

A curvature step frees the captured layer inputs and output gradients of the whole batch block by block
(estimator/local.py) while it allocates the forms the blocks keep (sampled rows, x and gy, J). glibc's
allocator keeps freed heap chunks mapped, and the kept forms are not always placed in them, so the
process's resident memory grows by the kept forms *beside* the freed captures: measured on ViT-tiny at
batch 32 (lab/memory_phases.py), the curvature step's peak over the baseline was 208 MB, 156 MB when the
freed memory is trimmed as it is freed. ``Trim`` calls glibc's ``malloc_trim(0)`` (which returns free
pages anywhere in the heap) once at least ``every`` bytes of CPU tensors were freed since its last call:
about 2 ms a call, so every 16 MiB costs a few calls per curvature step. Elsewhere (no glibc, CUDA
tensors: the caching allocator's reserve is torch's business) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

EVERY = 16 * 2 ** 20


def _libc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):       # not glibc (musl has no malloc_trim)
        return None


_TRIM = _libc_trim()


class Trim:
    def __init__(self, every: int = EVERY) -> None:
        self.every = every
        self.freed = 0

    def add(self, tensors) -> None:
        """Count the bytes of ``tensors`` (about to be freed; CPU ones only)."""
        for t in tensors:
            if t is not None and t.device.type == "cpu":
                self.freed += t.numel() * t.element_size()

    def now(self, force: bool = False) -> None:
        """Trim when ``every`` bytes were freed since the last trim (or ``force`` and any were)."""
        if _TRIM is not None and (self.freed >= self.every or (force and (self.freed or not self.every))):
            _TRIM(0)
            self.freed = 0
