"""What capture adds to an SGD step: forward + backward + torch.optim.SGD step of a model alone vs the
same step of a copy on which TENGraD's capture is armed (module hooks, the op-level TorchFunctionMode
around the forward, a tensor hook per captured output; tengrad/optim/op_capture.py). TENGraD's own
curvature work is not timed: the armed optimizer never steps, ``opt.zero_grad()`` drops its records.

Models: the paper's 3C1F (tengrad.demo.model.three_c_one_f) on [batch, 1, 28, 28], and the Transformer
LM of examples/transformer_lm.py (2 encoder layers, d_model 16, tied head) on [batch, 12] token ids.
The two steps alternate (round robin, so load drifts of a shared machine hit both), after a warm-up;
medians are reported with the machine; the overheads are medians over rounds of each round's
ratio to that round's SGD step. On a shared machine use one thread and the thread's CPU clock
(the defaults: ``--threads 1 --clock cpu``; ``--clock wall`` for wall time).

A third step times a reuse step: a copy whose TENGraD has taken one step with update_freq 10**9, so
curvature is not due and nothing is captured (the capture hooks are switched off: only the root's
gate pre-hook runs, tengrad/optim/hookset.py). The last column is the overhead per step averaged
over a cycle of TENGraD's default update_freq k = 10 (one armed step, nine reuse steps):
(armed + 9 reuse) / (10 SGD) - 1.

A staggered run (``TENGraD(..., stagger=True)``, tengrad/optim/stagger.py: block i refreshes its
curvature on steps t with (t - i) mod k == 0, k = 10) trains: each timed step is the same SGD step
with its capture armed for the blocks due at that step of the cycle, and TENGraD's own step (the
curvature work, which moves the schedule on) runs untimed after it, so the timed steps include
switching the blocks' hooks as training does. Its fused weight gradient (grad_from_jacobian,
curvature work moved into the backward) is off, as it is in the armed arm: capture alone. It runs in
its own round robin against its own SGD arm (as the floor does), at least ten cycles; the table
gives the largest and the mean over the k steps of the cycle of the per-step median overhead.

A fourth step is the floor under the armed step (benchmarks/capture_floor.py): the same models' ops
wrapped with the least a Python capture does per parameter use (one wrapper call, one identity
lookup, ``x.detach()``, one tensor hook keeping gy until the step) and nothing else; it runs in a
second round robin against its own SGD arm, its wrappers installed for that round robin only.
What TENGraD's armed step costs above that row is its own bookkeeping; the floor itself is what
any capture built from Python hooks pays (its last column gives the number of uses per step).

With ``--cpp-floor`` the floor's round robin has a third arm: the same wrappers with a C++ gradient
tap instead of the Python hook (capture_floor.cpp_tap, compiled on first use), the floor of any per-use
capture in eager PyTorch.

    .venv/bin/python benchmarks/capture_overhead.py [--repeats 40] [--batch 64 ...] [--width 16] \
        [--d-model 16 ...] [--cpp-floor]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tengrad  # noqa: E402
from benchmarks.capture_floor import FloorCapture  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from tengrad.demo.model import three_c_one_f  # noqa: E402

_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "transformer_lm.py")
_spec = importlib.util.spec_from_file_location("transformer_lm", _path)
transformer_lm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(transformer_lm)


def sgd_step(model, x, loss_fn, y, hooked=None, forward=None):
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    zero = (hooked or sgd).zero_grad   # TENGraD's zero_grad zeroes the same gradients and drops the
    #                                    captured records (as opt.step() would): one zero_grad per step
    forward = forward or model

    def step():
        zero()
        loss_fn(forward(x), y).backward()
        sgd.step()
    return step


class StaggeredRun:
    """One model under TENGraD(stagger=True, update_freq=k) that trains: each timed step is zero_grad,
    forward, backward and the SGD step (as the other arms); ``after`` (untimed) takes TENGraD's own
    step, which does the curvature work and moves the schedule on, so the next timed step arms the
    next blocks (their hook sets switched by the gate, as in training). ``phases`` holds the step of
    the cycle (steps mod k) each timed step captured for."""

    def __init__(self, plain, x, y, loss_fn, k: int = 10) -> None:
        self.model = copy.deepcopy(plain)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.opt = tengrad.TENGraD(self.model, lr=1e-3, damping=1.0, update_freq=k, stagger=True,
                                       grad_from_jacobian=False, prior=None)
        self.k = k
        self.step = sgd_step(self.model, x, loss_fn, y, self.opt)
        self.phases: list[int] = []
        self.step()                      # step 0 refreshes every block: not part of the cycle
        self.opt.step()

    def after(self) -> None:
        self.phases.append(self.opt._steps % self.k)
        self.opt.step()


def compare(make, x, y, loss_fn, repeats: int, warmup: int = 3, clock=time.perf_counter,
            cpp_floor: bool = False) -> tuple[float, ...]:
    torch.manual_seed(0)
    plain = make()
    armed = copy.deepcopy(plain)
    idle = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = tengrad.TENGraD(armed, lr=1e-3, damping=1.0, prior=None)   # never steps: capture stays armed
        # one TENGraD step, then curvature is not due again (update_freq huge): a reuse step's capture
        reuse = tengrad.TENGraD(idle, lr=1e-3, damping=1.0, update_freq=10 ** 9, kl_clip=None, prior=None)
        reuse.zero_grad()
        loss_fn(idle(x), y).backward()
        reuse.step()
    assert not reuse._curvature_due(), "the reuse optimizer would capture"
    steps = {"sgd": sgd_step(plain, x, loss_fn, y), "sgd+capture": sgd_step(armed, x, loss_fn, y, opt),
             "sgd+idle": sgd_step(idle, x, loss_fn, y, reuse)}
    times = interleave(steps, repeats, warmup, clock)
    assert opt._capture.ops.fwd > 0, "the capture never armed"
    assert reuse._capture.ops.fwd == 1, "the reuse optimizer captured after its curvature step"
    # the staggered run: its own round robin and SGD arm, every k-th round a whole cycle
    run = StaggeredRun(plain, x, y, loss_fn)
    srounds = max(repeats, 10 * run.k)     # at least ten samples of each step of the cycle
    stimes = interleave({"sgd": sgd_step(copy.deepcopy(plain), x, loss_fn, y), "stagger": run.step},
                        srounds, warmup, clock, after={"stagger": run.after})
    # the floor: a third round robin, its own SGD arm, the floor's wrappers installed only for it
    floor = FloorCapture(copy.deepcopy(plain))
    floor.install()     # before the next is built: it wraps this one's wrappers (each passes
    floors = [floor]    # straight through outside its own forward)
    arms = {"sgd": sgd_step(copy.deepcopy(plain), x, loss_fn, y),
            "sgd+floor": sgd_step(floor.model, x, loss_fn, y, floor, floor.forward)}
    try:
        if cpp_floor:       # the same wrappers with a C++ gradient tap (compiled on first use)
            cfloor = FloorCapture(copy.deepcopy(plain), tap="cpp")
            cfloor.install()
            floors.append(cfloor)
            arms["sgd+cpp"] = sgd_step(cfloor.model, x, loss_fn, y, cfloor, cfloor.forward)
        ftimes = interleave(arms, repeats, warmup, clock)
    finally:                # last installed first: functional's ops are the originals again
        for f in reversed(floors):
            f.uninstall()
    for f in floors:
        assert f.uses and all(gy is not None for gy in f.grads()), f"the {f.tap} floor arm captured nothing"
    med = [statistics.median(times[k]) for k in ("sgd", "sgd+capture", "sgd+idle")]
    # overheads: median over rounds of each round's ratio to that round's SGD step (the steps of a
    # round run back to back, so a load change between rounds cancels)
    ratios = [statistics.median(t / s for t, s in zip(times[k], times["sgd"])) for k in ("sgd+capture", "sgd+idle")]
    ratios.append(statistics.median(t / s for t, s in zip(ftimes["sgd+floor"], ftimes["sgd"])))
    cpp = (statistics.median(t / s for t, s in zip(ftimes["sgd+cpp"], ftimes["sgd"]))
           if cpp_floor else None)
    by_phase: dict[int, list[float]] = {}
    for phase, t, s in zip(run.phases[-srounds:], stimes["stagger"], stimes["sgd"]):
        by_phase.setdefault(phase, []).append(t / s)
    stag = [statistics.median(r) for r in by_phase.values()]
    return (*med, *ratios, len(floor.uses), max(stag), statistics.mean(stag), cpp)


def interleave(steps: dict, repeats: int, warmup: int, clock, after: dict | None = None) -> dict[str, list[float]]:
    """Round robin over ``steps`` (order alternated every round) after ``warmup`` rounds: times per step.
    ``after[name]``, if given, runs untimed right after each call of step ``name``."""
    after = after or {}
    times = {k: [] for k in steps}
    for _ in range(warmup):
        for k, f in steps.items():
            f()
            if k in after:
                after[k]()
    for r in range(repeats):
        for k, f in (steps.items() if r % 2 == 0 else reversed(steps.items())):
            t = clock()
            f()
            times[k].append(clock() - t)
            if k in after:
                after[k]()
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--batch", type=int, nargs="+", default=[64], help="one row per batch size")
    ap.add_argument("--width", type=int, default=16, help="3C1F's conv width")
    ap.add_argument("--d-model", type=int, nargs="+", default=[16],
                    help="the Transformer's d_model (the example's 16); one row per value")
    ap.add_argument("--models", nargs="+", choices=("3c1f", "transformer"), default=["3c1f", "transformer"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--cpp-floor", action="store_true",
                    help="also the floor with a compiled C++ gradient tap (capture_floor.py; builds a torch "
                         "extension on first use: a C++ compiler and ninja, about 40 s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batch:
        x = torch.randn(batch, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        if "3c1f" in args.models:
            rows.append((f"3C1F width {args.width}, batch {batch}",
                         *compare(lambda: three_c_one_f(width=args.width, hidden=64), x, y, F.cross_entropy,
                                  args.repeats, clock=clock, cpp_floor=args.cpp_floor)))
        ids, tgt = transformer_lm.batch(g, n=batch)
        for d_model in args.d_model if "transformer" in args.models else ():
            rows.append((f"Transformer LM (examples/transformer_lm.py), d_model {d_model}, batch {batch}",
                         *compare(lambda: transformer_lm.TinyLM(d_model=d_model), ids, tgt, transformer_lm.loss_fn,
                                  args.repeats, clock=clock, cpp_floor=args.cpp_floor)))
    print(f"machine: {machine()}; {args.repeats} interleaved repeats, median of the {args.clock} clock; "
          f"load average {os.getloadavg()[0]:.2f} at the end")
    print("| model | SGD step (ms) | with capture armed (ms) | armed overhead | reuse step, capture idle (ms) "
          "| idle overhead | per step at k = 10 | staggered k = 10: largest / mean "
          "| floor: Python capture minimum (uses) | floor with a C++ gradient tap |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, a, b, c, rb, rc, rf, uses, smax, smean, cpp in rows:
        k10 = (rb + 9 * rc) / 10 - 1
        print(f"| {name} | {a * 1e3:.2f} | {b * 1e3:.2f} | {100 * (rb - 1):+.1f}% | {c * 1e3:.2f} "
              f"| {100 * (rc - 1):+.1f}% | {100 * k10:+.1f}% | {100 * (smax - 1):+.1f}% / {100 * (smean - 1):+.1f}% "
              f"| {100 * (rf - 1):+.1f}% ({uses}) | {'-' if cpp is None else f'{100 * (cpp - 1):+.1f}%'} |")


if __name__ == "__main__":
    main()
