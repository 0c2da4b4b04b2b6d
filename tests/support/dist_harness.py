"""Run a function on R gloo processes (CPU) and collect each rank's result; fail, never hang.

Each process initialises a gloo process group through a fresh ``file://`` rendezvous (no port to pick)
with a collective timeout of ``pg_timeout`` seconds, runs ``fn(rank, world_size, *args)`` with one torch
thread, and sends back ("ok", result) or ("error", traceback). The parent waits at most ``timeout``
seconds for all ranks, then kills whatever still runs (only the processes it started) and raises.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta


def _entry(fn, rank, world_size, init_file, pg_timeout, args, out):
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=pg_timeout))
        try:
            result = fn(rank, world_size, *args)
        finally:
            try:
                dist.destroy_process_group()
            except Exception:   # noqa: BLE001 - a group broken by a timeout may not shut down cleanly
                pass
        out.put((rank, "ok", result))
    except BaseException:   # noqa: BLE001 - reported to the parent
        out.put((rank, "error", traceback.format_exc()))


def run(fn, world_size: int, *args, timeout: float = 100.0, pg_timeout: float = 30.0) -> list:
    """[result of rank 0, ..., rank R-1]; raises AssertionError on any rank's error or a hang."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, init_file, pg_timeout, args, out),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        results, errors = {}, {}
        deadline = time.monotonic() + timeout
        try:
            while len(results) + len(errors) < world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(world_size)) - set(results) - set(errors))
                    raise AssertionError(f"ranks {missing} did not finish within {timeout} s (hang?); "
                                         f"errors so far: {errors}")
                try:
                    rank, status, value = out.get(timeout=min(left, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                            and r not in results and r not in errors]
                    if dead:
                        raise AssertionError(f"ranks {dead} died (exit codes "
                                             f"{[procs[r].exitcode for r in dead]})") from None
                    continue
                (results if status == "ok" else errors)[rank] = value
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join()
    if errors:
        raise AssertionError("\n".join(f"rank {r}:\n{t}" for r, t in sorted(errors.items())))
    return [results[r] for r in range(world_size)]
