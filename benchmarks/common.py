"""Shared timing helpers for the CPU benchmarks: warm-up, then the median of repeats."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time

import torch


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matrix-multiply rate in FLOP/s (n x n times n x n)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_time(lambda: a @ b, repeats)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def torch_step(model, opt, x, y, loss):
    """One training step of a torch optimizer (SGD, TENGraD): ``zero_grad(); loss(model(x), y).backward();
    step()``."""
    def step():
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    return step


def asdl_step(model, gm, x, y, loss):
    """One training step of an ASDL gradient maker ``gm`` (K-FAC, SMW): its forward and backward, which
    leave the preconditioned gradient in ``p.grad``, then a plain SGD step (lr 1e-3, momentum 0.9)."""
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        sgd.zero_grad()
        dummy = gm.setup_model_call(model, x)
        gm.setup_loss_call(loss, dummy, y)
        gm.forward_and_backward()
        sgd.step()
    return step
