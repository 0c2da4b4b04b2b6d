"""Run functions on gloo process groups (CPU) and collect each rank's result; fail, never hang.

A run is a list of phases, each ``Phase(fn, world, args, pg_timeout, timeout)``. ``max(world)`` processes
are spawned once (a torch import and the first steps cost seconds per process) and run the phases in
order: in each phase the ranks below its world size initialise a gloo process group through a fresh
``file://`` rendezvous (no port to pick) with a collective timeout of ``pg_timeout`` seconds, run
``fn(rank, world, *args)`` with one torch thread, destroy the group and send back ("ok", result) or
("error", traceback); a rank whose phase failed goes on with the next phase. A phase must finish within
its ``timeout`` seconds from the end of the one before (from the start for the first); otherwise the
parent kills every process it started (only those) and that phase and the later ones fail.

``start(phases)`` returns at once (the processes run while the caller does other work); ``Run.result(i)``
waits for phase i and returns [result of rank 0, ..., rank world-1], or raises AssertionError with every
rank's error. ``run(fn, world, *args)`` is the one-phase, blocking form.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable


@dataclass(frozen=True)
class Phase:
    fn: Callable              # a module-level function (it is pickled by reference): fn(rank, world, *args)
    world: int
    args: tuple = ()
    pg_timeout: float = 30.0  # the process group's collective timeout, seconds
    timeout: float = 150.0    # the parent's limit for this phase, seconds


def _entry(rank, phases, init_files, out, niceness=0):
    if niceness and hasattr(os, "nice"):
        os.nice(niceness)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
    except BaseException:   # noqa: BLE001 - reported to the parent for every phase of this rank
        tb = traceback.format_exc()
        for i, ph in enumerate(phases):
            if rank < ph.world:
                out.put((i, rank, "error", tb, time.time()))
        return
    for i, ph in enumerate(phases):
        if rank >= ph.world:
            continue
        try:
            dist.init_process_group("gloo", init_method=f"file://{init_files[i]}", rank=rank,
                                    world_size=ph.world, timeout=timedelta(seconds=ph.pg_timeout))
            try:
                result = ph.fn(rank, ph.world, *ph.args)
            finally:
                try:
                    dist.destroy_process_group()
                except Exception:   # noqa: BLE001 - a group broken by a timeout may not shut down cleanly
                    pass
            out.put((i, rank, "ok", result, time.time()))
        except BaseException:   # noqa: BLE001 - reported to the parent
            out.put((i, rank, "error", traceback.format_exc(), time.time()))


class Run:
    """The processes of one run; results are collected as the caller asks for them."""

    def __init__(self, phases: list[Phase], niceness: int = 0):
        self.phases = list(phases)
        self._tmp = tempfile.mkdtemp(prefix="tengrad-dist-")
        init_files = [os.path.join(self._tmp, f"rendezvous-{i}") for i in range(len(self.phases))]
        ctx = mp.get_context("spawn")
        self._out = ctx.Queue()
        self._procs = [ctx.Process(target=_entry, args=(r, self.phases, init_files, self._out, niceness),
                                   daemon=True)
                       for r in range(max(ph.world for ph in self.phases))]
        for p in self._procs:
            p.start()
        self._got: list[dict] = [{} for _ in self.phases]      # phase -> {rank: (status, value)}
        self._done_at: list[float | None] = [None] * len(self.phases)   # when its last rank reported (time.time)
        self._failed: dict[int, str] = {}                      # phase -> why it did not finish
        self._start = time.time()

    def _complete(self, i: int) -> bool:
        return len(self._got[i]) == self.phases[i].world

    def _deadline(self, i: int) -> float:
        """Phase i must end ``timeout`` seconds after the previous one ended (the ranks' clock, time.time(),
        as they reported: the parent may read their reports much later, while it runs other tests)."""
        before = self._start if i == 0 else self._done_at[i - 1]
        return before + self.phases[i].timeout

    def _take(self, block: float) -> bool:
        """Read the reports waiting in the queue (waiting at most ``block`` seconds for the first)."""
        try:
            item = self._out.get(timeout=block) if block > 0 else self._out.get_nowait()
        except queue.Empty:
            return False
        while True:
            k, rank, status, value, t = item
            self._got[k][rank] = (status, value)
            if self._complete(k):
                prev = self._done_at[k - 1] if k and self._done_at[k - 1] is not None else self._start
                self._done_at[k] = max(t, prev)
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                return True

    def _wait(self, want: int) -> None:
        while not self._complete(want) and want not in self._failed:
            self._take(0)
            if self._complete(want):
                break
            i = next(k for k in range(len(self.phases)) if not self._complete(k))   # the phase running now
            if time.time() > self._deadline(i):
                missing = sorted(set(range(self.phases[i].world)) - set(self._got[i]))
                self._fail_from(i, f"ranks {missing} did not finish phase {i} within {self.phases[i].timeout} s "
                                   f"(hang?); errors so far: {self._errors(i)}")
                break
            if self._take(min(1.0, max(0.01, self._deadline(i) - time.time()))):
                continue
            dead = [r for r in range(self.phases[i].world) if self._procs[r].exitcode not in (None, 0)
                    and r not in self._got[i]]
            if dead:
                self._take(0)      # a report sent just before the end
                dead = [r for r in dead if r not in self._got[i]]
                if dead:
                    self._fail_from(i, f"ranks {dead} died (exit codes {[self._procs[r].exitcode for r in dead]})")
                    break
        if all(self._complete(k) or k in self._failed for k in range(len(self.phases))):
            self.stop()

    def _errors(self, i: int) -> dict:
        return {r: v for r, (s, v) in self._got[i].items() if s == "error"}

    def _fail_from(self, i: int, why: str) -> None:
        self.stop()
        for k in range(i, len(self.phases)):
            if not self._complete(k):
                self._failed[k] = why if k == i else f"not run: phase {i} failed ({why})"

    def result(self, i: int = 0) -> list:
        """[result of rank 0, ..., rank world-1] of phase i; AssertionError on any rank's error or a hang."""
        self._wait(i)
        if i in self._failed:
            raise AssertionError(self._failed[i])
        errors = self._errors(i)
        if errors:
            raise AssertionError("\n".join(f"rank {r}:\n{t}" for r, t in sorted(errors.items())))
        return [self._got[i][r][1] for r in range(self.phases[i].world)]

    def stop(self) -> None:
        """End the processes (only those this run started) and remove the rendezvous files: a run whose
        phases all reported gets 5 s per process to exit, an unfinished one (a hang, or the session ended
        early) is killed at once."""
        finished = all(self._complete(k) for k in range(len(self.phases)))
        for p in self._procs:
            p.join(timeout=5 if finished else 0)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(self._tmp, ignore_errors=True)


def start(phases: list[Phase], niceness: int = 0) -> Run:
    """Spawn the processes (``niceness`` added to their scheduling priority) and return at once."""
    return Run(phases, niceness)


def run(fn, world_size: int, *args, timeout: float = 100.0, pg_timeout: float = 30.0) -> list:
    """One phase, blocking: [result of rank 0, ..., rank R-1]; raises AssertionError on any rank's error or
    a hang."""
    return start([Phase(fn, world_size, args, pg_timeout, timeout)]).result(0)
