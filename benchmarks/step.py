"""Median wall time per optimizer step for the paper's 3C1F network on this CPU.

Every timed step is a full training step: forward, backward and the optimizer's work
(``zero_grad(); cross_entropy(model(x), y).backward(); step()``, or ASDL's
``setup_model_call/setup_loss_call/forward_and_backward`` followed by ``sgd.step()``).

Methods (batch 128, ASDL's data_size = batch as it requires):

* SGD with momentum (torch.optim.SGD)
* TENGraD (empirical Fisher) at curvature interval k = 1, 10, 100 (``update_freq=k``)
* ASDL 0.1a5 K-FAC (``KfacGradientMaker``, empirical Fisher, curvature and preconditioner
  intervals both k = 1, 10, 100)
* ASDL 0.1a5 SMW empirical natural gradient (``SmwEmpNaturalGradientMaker``): a whole-network
  empirical Fisher through the Woodbury identity with an approximate conv Gram; curvature every step.

Interval k > 1: a step either refreshes the curvature ("update step") or reuses the kept one
("reuse step"). Both are timed separately and the cost per step at interval k is
(update + (k - 1) * reuse) / k, so a 100-step cycle never has to be run at full width. Update steps
come from an instance with interval 1, reuse steps from an instance whose interval is never reached
again after its first (warm-up) step.

Method: every configuration of one width gets its own copy of the same initial model and the same
fixed random batch; each is warmed up (``--warmup`` steps), then the configurations are timed one step
each in turn (round-robin in an order shuffled every round, so drifts of a shared machine's load and
what one step leaves for the next hit all alike) until each has
``--repeats`` steps or has spent ``--budget-s`` seconds; the median is reported. A configuration whose
first warm-up step alone exceeds the budget is reported from that single step (marked *).

    .venv/bin/python benchmarks/step.py            # channels 32 and 128 (tens of minutes on 2 cores)
    .venv/bin/python benchmarks/step.py --quick    # smoke run: channels 8, few repeats

Real architectures (issue 8; benchmarks/step_models.py): ``--models transformer resnet`` times the
Transformer LM of examples/transformer_lm.py and the ResNet with BatchNorm of examples/resnet_bn.py
(SGD, TENGraD update and reuse step, ASDL K-FAC where it runs; the table says what ASDL did when it
raised or left layers alone). ``--clock cpu`` times the thread's CPU clock (use with ``--threads 1``
on a shared machine).

    .venv/bin/python benchmarks/step.py --models transformer resnet --threads 1 --clock cpu

Issue 23's models (benchmarks/step_zoo.py, zoo_models.py): SGD, AdamW, TENGraD curvature/reuse/k = 10
steps, CPU-time ratios, and per arm the working memory (peak RSS over the baseline) and optimizer bytes:

    .venv/bin/python benchmarks/step.py --zoo resnet18 vit_tiny gpt mlp4096 3c1f --repeats 5
    .venv/bin/python benchmarks/step.py --zoo mlp4096 --curvature-batch 64

``--baseline REF`` adds TENGraD as it was at git ref REF (benchmarks/baseline.py imports that package
under another name) to the same round robin, so a change is compared with its parent in one process:

    .venv/bin/python benchmarks/step.py --baseline HEAD~3 --models 3c1f transformer resnet --methods sgd tengrad
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tengrad.demo.model import three_c_one_f  # noqa: E402
from benchmarks.common import asdl_step, torch_step  # noqa: E402

NEVER = 10 ** 9  # an interval no benchmark reaches: after the first step only reuse steps follow


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads")


CLOCK = time.perf_counter


class Timer:
    """Times one configuration's steps; many Timers are run round-robin (see ``run_round_robin``)."""

    def __init__(self, step, warmup: int, repeats: int, budget_s: float):
        self.step, self.warmup, self.repeats, self.budget_s = step, warmup, repeats, budget_s
        self.times: list[float] = []
        self.cpu: list[float] = []     # process CPU time of the same steps (all threads; not preempted time)
        self.single = False

    def warm(self) -> None:
        t0 = CLOCK()
        self.step()
        first = CLOCK() - t0
        if first > self.budget_s:  # too slow to repeat: the warm-up step is the measurement
            self.times, self.single = [first], True
            return
        for _ in range(self.warmup - 1):
            self.step()

    @property
    def done(self) -> bool:
        return len(self.times) >= self.repeats or (bool(self.times) and sum(self.times) >= self.budget_s)

    def once(self) -> None:
        c0, t0 = time.process_time(), CLOCK()
        self.step()
        self.times.append(CLOCK() - t0)
        self.cpu.append(time.process_time() - c0)

    def result(self) -> tuple[float, int, bool]:
        return statistics.median(self.times), len(self.times), self.single

    def cpu_median(self) -> float:
        return statistics.median(self.cpu) if self.cpu else float("nan")


def run_round_robin(timers: dict, seed: int = 0) -> dict:
    """Warm every timer up, then time one step of each in turn until all are done, in an order
    shuffled every round.

    Interleaving spreads slow drifts of a shared machine's load over all configurations alike; the
    shuffle spreads what a step leaves behind for the next one (a curvature step's large buffers
    freed to the OS, evicted caches: measured 10-15 ms on the step after it at C=32) instead of
    charging it to whichever configuration always follows.
    """
    order = list(timers.values())
    for t in order:
        t.warm()
    rng = random.Random(seed)
    while not all(t.done for t in order):
        rng.shuffle(order)
        for t in order:
            if not t.done:
                t.once()
    return {key: t.result() for key, t in timers.items()}


def cpu_ratios(timers: dict, width: int) -> list[str]:
    """Lines "C=w method kind: cpu ms (x SGD)" from the timers' process CPU times (a loaded machine
    preempts a process; its CPU time counts only what it ran)."""
    base = timers[("sgd", "every")].cpu_median() if ("sgd", "every") in timers else float("nan")
    return [f"  C={width:<4} {meth:<8} {kind:<6} cpu {1000 * t.cpu_median():,.0f} ms ({t.cpu_median() / base:.3f}x SGD)"
            for (meth, kind), t in timers.items()]


class Bench:
    """The step functions of every configuration at one width (each with its own model copy)."""

    def __init__(self, width: int, hidden: int, batch: int, damping: float, seed: int = 0):
        self.width, self.hidden, self.batch, self.damping = width, hidden, batch, damping
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, 1, 28, 28, generator=g)
        self.y = torch.randint(0, 10, (batch,), generator=g)
        self.seed = seed

    def model(self):
        torch.manual_seed(self.seed)
        return three_c_one_f(width=self.width, hidden=self.hidden)

    def torch_step(self, model, opt):
        return torch_step(model, opt, self.x, self.y, F.cross_entropy)

    def asdl_step(self, model, gm):
        return asdl_step(model, gm, self.x, self.y, F.cross_entropy)

    # Each returns {kind: step}, kind "every" (no interval), or "update" and "reuse".
    def sgd(self):
        m = self.model()
        return {"every": self.torch_step(m, torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9))}

    def tengrad(self, package=None):
        """``package``: another tengrad (``--baseline``), else the working tree's."""
        import tengrad

        package = package or tengrad
        steps = {}
        for kind, k in (("update", 1), ("reuse", NEVER)):  # NEVER: the warm-up's first step is the only update
            m = self.model()
            opt = package.TENGraD(m, 1e-3, self.damping, momentum=0.9, update_freq=k, fisher="empirical", prior=None)
            steps[kind] = self.torch_step(m, opt)
        return steps

    def kfac(self):
        from asdl import KfacGradientMaker, PreconditioningConfig

        steps = {}
        for kind, k in (("update", 1), ("reuse", NEVER)):
            m = self.model()
            cfg = PreconditioningConfig(data_size=self.batch, damping=self.damping,
                                        preconditioner_upd_interval=k, curvature_upd_interval=k)
            steps[kind] = self.asdl_step(m, KfacGradientMaker(m, cfg, fisher_type="fisher_emp"))
        return steps

    def smw(self):
        from asdl import SmwEmpNaturalGradientConfig, SmwEmpNaturalGradientMaker

        m = self.model()
        cfg = SmwEmpNaturalGradientConfig(data_size=self.batch, damping=self.damping)
        return {"every": self.asdl_step(m, SmwEmpNaturalGradientMaker(m, cfg))}


BASELINE = None   # (label, package) of --baseline


def steps_of(bench, meth: str) -> dict:
    """{kind: step} of one method; "baseline" is TENGraD from the --baseline package."""
    if meth == "baseline":
        return bench.tengrad(BASELINE[1])
    return getattr(bench, meth)()


def per_step(res: dict, k: int) -> tuple[float, bool]:
    if "every" in res:
        return res["every"][0], res["every"][2]
    u, r = res["update"], res["reuse"]
    return (u[0] + (k - 1) * r[0]) / k, (u[2] or (k > 1 and r[2]))


def fmt_ms(s: float, single: bool = False) -> str:
    return f"{1000 * s:,.0f}{'*' if single else ''}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, nargs="+", default=[32, 128])
    p.add_argument("--hidden", type=int, default=500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--damping", type=float, default=0.1)
    p.add_argument("--intervals", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--budget-s", type=float, default=60.0, help="time budget per configuration")
    p.add_argument("--methods", nargs="+", default=["sgd", "tengrad", "kfac", "smw"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: channels 8, 1 warm-up, 2 repeats")
    p.add_argument("--models", nargs="+", default=["3c1f"], choices=["3c1f", "transformer", "resnet"])
    p.add_argument("--d-model", type=int, default=64, help="the Transformer's d_model (--models transformer)")
    p.add_argument("--width", type=int, default=16, help="the ResNet's width (--models resnet)")
    p.add_argument("--model-batch", type=int, default=64, help="batch of the transformer/resnet rows")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: the thread's CPU clock (time.thread_time), for a shared machine")
    p.add_argument("--baseline", metavar="REF", default=None,
                   help="also time TENGraD as it was at git ref REF, in the same round robin (baseline.py)")
    p.add_argument("--zoo", nargs="+", default=None, metavar="MODEL",
                   help="issue 23's rows (step_zoo.py): resnet18 vit_tiny gpt mlp4096 3c1f")
    p.add_argument("--curvature-batch", type=int, default=None, help="--zoo: also TENGraD with this curvature_batch")
    p.add_argument("--gpt-d", type=int, default=256)
    p.add_argument("--gpt-layers", type=int, default=4)
    p.add_argument("--gpt-vocab", type=int, default=4096)
    p.add_argument("--no-memory", action="store_true", help="--zoo: skip the per-arm memory processes")
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.quick:
        args.channels, args.warmup, args.repeats, args.budget_s = [8], 1, 2, 10.0
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # ASDL's hook and scalar-conversion warnings
    if args.zoo:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from step_zoo import run_zoo
        run_zoo(args, Timer, run_round_robin, machine)
        return 0

    import tengrad

    have = {"tengrad": hasattr(tengrad, "TENGraD")}
    try:
        import asdl  # noqa: F401  (pip name asdfghjkl==0.1a5)
        have["kfac"] = have["smw"] = True
    except ImportError:
        have["kfac"] = have["smw"] = False
    methods = [m for m in args.methods if have.get(m, True)]
    global BASELINE
    if args.baseline:
        from baseline import load
        BASELINE = (f"TENGraD at {args.baseline}", load(args.baseline))
        methods.append("baseline")
    skipped = [m for m in args.methods if m not in methods]
    if skipped:
        print(f"skipped (not installed): {', '.join(skipped)}", file=sys.stderr)

    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start", file=sys.stderr)
    real = [m for m in args.models if m != "3c1f"]
    if real:
        run_models(args, real, methods)
    if "3c1f" not in args.models:
        return 0
    results = {}  # (method, width) -> {kind: (median, n, single)}
    cpu_lines: dict[int, list[str]] = {}
    t_all = time.perf_counter()
    for w in args.channels:
        b = Bench(w, args.hidden, args.batch, args.damping)
        t0 = time.perf_counter()
        timers = {(meth, kind): Timer(step, args.warmup, args.repeats, args.budget_s)
                  for meth in methods for kind, step in steps_of(b, meth).items()}
        for (meth, kind), res in run_round_robin(timers).items():
            results.setdefault((meth, w), {})[kind] = res
        base = results["sgd", w]["every"][0] if "sgd" in methods else float("nan")
        for meth in methods:
            detail = ", ".join(f"{k} {fmt_ms(v[0], v[2])} ms (n={v[1]}, {v[0] / base:.3f}x SGD)"
                               for k, v in results[meth, w].items())
            print(f"  C={w:<4} {meth:<8} {detail}", file=sys.stderr)
        cpu_lines[w] = cpu_ratios(timers, w)
        print("\n".join(cpu_lines[w]), file=sys.stderr)
        print(f"  load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
        print(f"  C={w}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        del timers, b

    labels = {
        "sgd": "SGD (momentum)",
        "tengrad": "TENGraD, empirical Fisher",
        "kfac": "ASDL K-FAC, empirical Fisher",
        "smw": "ASDL SMW emp. NG (whole network, approx. conv Gram)",
        "baseline": BASELINE[0] if BASELINE else "",
    }
    rows = []
    for meth in methods:
        ks = [1] if meth in ("sgd", "smw") else args.intervals
        for k in ks:
            row = [labels[meth], "-" if meth == "sgd" else str(k)]
            for w in args.channels:
                s, single = per_step(results[meth, w], k)
                base = per_step(results["sgd", w], 1)[0] if "sgd" in methods else float("nan")
                row += [fmt_ms(s, single), f"{s / base:.1f}x"]
            rows.append(row)
    head = ["method", "curvature interval k"]
    for w in args.channels:
        n_params = sum(q.numel() for q in three_c_one_f(w, args.hidden).parameters())
        head += [f"C={w} ({n_params / 1e6:.2f}M params) ms/step", "vs SGD"]
    print(f"\n3C1F (three 3x3 convs of C channels on 28x28, 3x3 max-pool, FC 81C->{args.hidden}, FC->10), "
          f"batch {args.batch}, damping {args.damping:g}; median of up to {args.repeats} timed steps after "
          f"{args.warmup} warm-up, configurations interleaved round-robin (order shuffled per round); "
          f"per step at interval k = (update + (k-1) reuse) / k.")
    print(f"Machine: {machine()}. Load average {os.getloadavg()[0]:.2f} at the end; "
          f"total {time.perf_counter() - t_all:.0f} s.\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\nRaw medians (ms): update step / reuse step (n timed)")
    print("| method | C | update step | reuse step |")
    print("|---|---|---|---|")
    for (meth, w), res in results.items():
        if "every" in res:
            e = res["every"]
            print(f"| {labels[meth]} | {w} | {fmt_ms(e[0], e[2])} (n={e[1]}) | same |")
        else:
            u, r = res["update"], res["reuse"]
            print(f"| {labels[meth]} | {w} | {fmt_ms(u[0], u[2])} (n={u[1]}) | {fmt_ms(r[0], r[2])} (n={r[1]}) |")
    print("\nMedian process CPU time of the same steps (all threads; time the process was preempted does not count):")
    for w in args.channels:
        print("\n".join(cpu_lines[w]))
    if any(v[2] for res in results.values() for v in res.values()):
        print("\n* one step only: its warm-up step exceeded the per-configuration budget.")
    return 0


def run_models(args, names: list[str], methods: list[str]) -> None:
    """The real-architecture rows (step_models.py): one table per model, per-step costs at k = 1,
    reuse and k = 10 composed as for 3C1F."""
    from step_models import ModelBench

    labels = {"sgd": "SGD (momentum)", "tengrad": "TENGraD, empirical Fisher",
              "kfac": "ASDL K-FAC, empirical Fisher, as is",
              "kfac_ignoring": "ASDL K-FAC, refused modules ignored",
              "baseline": BASELINE[0] if BASELINE else ""}
    for name in names:
        b = ModelBench(name, args.model_batch, args.damping, d_model=args.d_model, width=args.width)
        meths = [m for m in methods if m in ("sgd", "tengrad", "kfac", "baseline")]
        if "kfac" in meths:
            meths.append("kfac_ignoring")
        t0 = time.perf_counter()
        timers = {(meth, kind): Timer(step, args.warmup, args.repeats, args.budget_s)
                  for meth in meths for kind, step in steps_of(b, meth).items()}
        res: dict = {}
        for (meth, kind), r in run_round_robin(timers).items():
            res.setdefault(meth, {})[kind] = r
        base = per_step(res["sgd"], 1)[0] if "sgd" in res else float("nan")
        print(f"\n{name}: {b.size}, {b.n_params:,} parameters in {b.n_tensors} tensors, batch {b.batch}, "
              f"damping {b.damping:g}; median of up to {args.repeats} timed steps ({args.clock} clock) after "
              f"{args.warmup} warm-up, interleaved round-robin; k = 10: (update + 9 reuse) / 10.")
        print(f"Machine: {machine()}. Load average {os.getloadavg()[0]:.2f} at the end; "
              f"{time.perf_counter() - t0:.0f} s.\n")
        print("| method | update step ms (vs SGD) | reuse step ms (vs SGD) | k = 10 ms/step (vs SGD) | notes |")
        print("|---|---|---|---|---|")
        for meth in meths:
            note = b.notes.get(meth, "")
            if meth not in res:
                if note:
                    print(f"| {labels[meth]} | - | - | - | {note} |")
                continue
            r = res[meth]

            def cell(s, single=False):
                return f"{s * 1e3:.2f}{'*' if single else ''} ({s / base:.2f}x)"
            if "every" in r:
                e = r["every"]
                print(f"| {labels[meth]} | {cell(e[0], e[2])} | same | same | n={e[1]} {note} |")
            else:
                u, rr = r["update"], r["reuse"]
                k10 = (u[0] + 9 * rr[0]) / 10
                print(f"| {labels[meth]} | {cell(u[0], u[2])} | {cell(rr[0], rr[2])} | {cell(k10)} | "
                      f"n={u[1]}/{rr[1]}; {note} |")


if __name__ == "__main__":
    sys.exit(main())
