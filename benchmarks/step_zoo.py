"""Issue 23's rows: SGD, AdamW and TENGraD on the models people train (benchmarks/zoo_models.py).

Per model, one process, every arm with its own copy of the same initial weights and the same fixed
batch, warmed up, then timed one step each in turn (step.py's round robin, order shuffled per round):

* SGD (momentum 0.9), AdamW: a full step (zero_grad, forward, backward, step);
* TENGraD (empirical Fisher, damping 1): the curvature step (``update_freq=1``), the reuse step
  (kept curvature: an interval never reached again) and the average over a k = 10 cycle,
  (curvature + 9 reuse) / 10; with ``--curvature-batch c`` a second TENGraD arm samples c rows.

Wall-time medians and process-CPU-time medians (all threads; preempted time does not count: prefer
its ratios on a loaded machine). Memory, per arm in a fresh spawned process: the baseline RSS after
building the model and the batch, then 3 steps (TENGraD at k = 10: one curvature step, two reuse
steps); peak RSS (VmHWM) minus that baseline is the arm's working memory; "optimizer bytes" is what
the optimizer holds after the steps (its state buffers, and TENGraD's kept curvature: x, gy, J, K, L,
counted once per storage).

    .venv/bin/python benchmarks/step.py --zoo resnet18 vit_tiny gpt mlp4096 3c1f
    .venv/bin/python benchmarks/step.py --zoo mlp4096 --curvature-batch 64 --repeats 3
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
import warnings

import torch

from zoo_models import build

NEVER = 10 ** 9


def make_opt(method: str, model, k: int = NEVER, curvature_batch: int | None = None):
    import tengrad
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = {} if curvature_batch is None else {"curvature_batch": curvature_batch}   # None: the default
        return tengrad.TENGraD(model, 1e-3, 1.0, momentum=0.9, update_freq=k, **{"prior": None, **extra})


def step_fn(model, opt, x, y, loss):
    def step():
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    return step


def arms(name: str, curvature_batch: int | None, gpt: dict) -> dict:
    """{(method, kind): step function} for one model."""
    factory, x, y, loss, _ = build(name, **gpt)
    out = {}
    for meth in ("sgd", "adamw"):
        m = factory()
        out[(meth, "every")] = step_fn(m, make_opt(meth, m), x, y, loss)
    variants = [("tengrad", None)] + ([(f"tengrad c={curvature_batch}", curvature_batch)] if curvature_batch else [])
    for label, c in variants:
        for kind, k in (("update", 1), ("reuse", NEVER)):
            m = factory()
            out[(label, kind)] = step_fn(m, make_opt("tengrad", m, k, c), x, y, loss)
    return out


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def held_bytes(opt) -> int:
    """Bytes of the optimizer's state and kept curvature, once per storage."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel():
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    for st in opt.state.values():
        for v in st.values():
            add(v)
    for b in getattr(opt, "blocks", []):
        c = b.curv
        if c is not None:
            for t in (c.x, c.gy, c.jac, c.gram, c.chol, *(c.pieces or ())):
                add(t)
    return total


def _memory_child(name, method, curvature_batch, gpt, threads, queue):
    torch.set_num_threads(threads)
    factory, x, y, loss, _ = build(name, **gpt)
    model = factory()
    opt = make_opt(method, model, 10, curvature_batch) if method.startswith("tengrad") else make_opt(method, model)
    base = _rss("VmRSS")
    step = step_fn(model, opt, x, y, loss)
    for _ in range(3):
        step()
    queue.put((_rss("VmHWM") - base, held_bytes(opt)))


def memory(name: str, method: str, curvature_batch, gpt: dict, threads: int) -> tuple[int, int]:
    """(peak RSS over the baseline, optimizer bytes) of 3 steps in a fresh process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_memory_child, args=(name, method, curvature_batch, gpt, threads, q))
    p.start()
    out = q.get()
    p.join()
    return out


def run_zoo(args, Timer, run_round_robin, machine) -> None:
    gpt = dict(gpt_d=args.gpt_d, gpt_layers=args.gpt_layers, gpt_vocab=args.gpt_vocab)
    for name in args.zoo:
        t0 = time.perf_counter()
        factory, *_, size = build(name, **gpt)
        # a throwaway copy first, kept while the arms run: the first model a process builds ran its forward
        # and backward up to 35% slower than the next ones (the 4096 MLP, three identical SGD arms: 419 / 317
        # / 305 ms; with a copy built first 318 / 311 / 313 ms), so whichever arm came first (SGD) looked slow
        throwaway = factory()
        timers = {key: Timer(fn, args.warmup, args.repeats, args.budget_s)
                  for key, fn in arms(name, args.curvature_batch, gpt).items()}
        res = run_round_robin(timers)
        del throwaway
        sgd_wall, sgd_cpu = res[("sgd", "every")][0], timers[("sgd", "every")].cpu_median()
        print(f"\n{size}: median of up to {args.repeats} steps after {args.warmup} warm-up, interleaved; "
              f"k = 10: (curvature + 9 reuse) / 10.\nMachine: {machine()}; load average "
              f"{os.getloadavg()[0]:.2f} at the end; {time.perf_counter() - t0:.0f} s.\n")
        print("| method | step | wall ms (x SGD) | CPU ms (x SGD) |")
        print("|---|---|---|---|")
        for (meth, kind), t in timers.items():
            wall, cpu = res[(meth, kind)][0], t.cpu_median()
            print(f"| {meth} | {kind} | {wall * 1e3:.1f} ({wall / sgd_wall:.2f}x) | {cpu * 1e3:.1f} ({cpu / sgd_cpu:.2f}x) |")
        for meth in sorted({m for m, _ in timers if m.startswith("tengrad")}):
            w = (res[(meth, "update")][0] + 9 * res[(meth, "reuse")][0]) / 10
            c = (timers[(meth, "update")].cpu_median() + 9 * timers[(meth, "reuse")].cpu_median()) / 10
            print(f"| {meth} | k = 10 average | {w * 1e3:.1f} ({w / sgd_wall:.2f}x) | {c * 1e3:.1f} ({c / sgd_cpu:.2f}x) |")
        if args.no_memory:
            continue
        print("\n| method | working memory MB (peak RSS - baseline) | x SGD's | optimizer bytes MB |")
        print("|---|---|---|---|")
        methods = ["sgd", "adamw", "tengrad"] + (["tengrad c"] if args.curvature_batch else [])
        sgd_mem = None
        for meth in methods:
            c = args.curvature_batch if meth == "tengrad c" else None
            peak, held = memory(name, "tengrad" if meth.startswith("tengrad") else meth, c, gpt,
                                torch.get_num_threads())
            sgd_mem = sgd_mem or peak
            label = f"tengrad c={c}" if c else meth
            print(f"| {label} | {peak / 2 ** 20:.0f} | {peak / sgd_mem:.2f}x | {held / 2 ** 20:.1f} |")
