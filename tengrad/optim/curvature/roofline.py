"""The machine's matmul rate and memory bandwidth, measured once per device and cached (paths.py).

A step's operation costs, in seconds, t = flops / F + bytes / B: F the float32 matrix-multiply rate
(FLOP/s), B the rate at which a large tensor is read (bytes/s). The explicit Jacobian's mat-vecs
(J g, J^T u: 2 r P flops reading 4 r P bytes each) are bound by B, the reuse path's products by F;
a flop count alone prices the two alike (paths.py).

``measured(device)``: F from a 512 x 512 x 512 product, B from the sum of a 64 MiB tensor, each the
best of 3 after a warm-up (about 0.1 s on a CPU, once per process and device type). TENGraD measures
it when it is built (optimizer.py), before training: the buffer (larger than a CPU's last-level cache,
so B is the memory's rate) is freed before the model's activations and a curvature step's captured
tensors exist, so it does not add to the process's peak memory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Roofline:
    flops_per_s: float
    bytes_per_s: float

    def seconds(self, flops: float, nbytes: float) -> float:
        return flops / self.flops_per_s + nbytes / self.bytes_per_s


_CACHE: dict[str, Roofline] = {}


def _best(fn, device: torch.device, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return max(min(times), 1e-9)


def measured(device: torch.device | str = "cpu") -> Roofline:
    """F and B of ``device`` (module docstring), measured on the first call for its type."""
    device = torch.device(device)
    key = device.type
    if key not in _CACHE:
        with torch.no_grad():
            n = 512
            a = torch.randn(n, n, device=device)
            b = torch.randn(n, n, device=device)
            flops = 2 * n ** 3 / _best(lambda: a @ b, device)
            big = torch.ones(16 * 2 ** 20, device=device)          # 64 MiB of float32
            rate = big.numel() * 4 / _best(lambda: big.sum(), device)
        _CACHE[key] = Roofline(flops, rate)
    return _CACHE[key]
