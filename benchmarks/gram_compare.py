"""plan.gram of two source trees (before / after a change), timed call by call, interleaved, in one run.

Method: two worker processes, each importing ``tengrad`` from its own tree (``PYTHONPATH``), build the
same layers and inputs (same seeds, float32, the rows of ``gram.py``). For every row and every order
(the plan's choice, then each fixed order) the driver warms both up with one untimed call, then
alternates single timed calls before, after, before, after ... ``--repeats`` times each and reports
the medians, so that both sides see the same machine load. Orders whose extra memory exceeds
``--max-gib`` are not run ("cap"); "-" means the tree has no such order; a fixed order whose warm-up
call took longer than ``--max-seconds`` is not repeated ("slow"). On a shared machine,
``--threads 1 --clock cpu`` (each worker one thread, process CPU time) is far less noisy than wall
time: a descheduled worker does not count the time it waits.

    python benchmarks/gram_compare.py --before /work/tmp7/base --after . --repeats 5
    python benchmarks/gram_compare.py --before /work/tmp7/base --threads 1 --clock cpu --repeats 7
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ORDERS = ("direct", "factored", "factored_raw")


def worker() -> None:
    import torch

    import tengrad
    sys.path.insert(1, HERE)
    from gram import rows

    state: dict = {}
    clock = time.process_time if os.environ.get("GRAM_COMPARE_CLOCK") == "cpu" else time.perf_counter
    if os.environ.get("GRAM_COMPARE_THREADS"):
        torch.set_num_threads(int(os.environ["GRAM_COMPARE_THREADS"]))
    for line in sys.stdin:
        cmd = json.loads(line)
        if "setup" in cmd:
            name, make, shape = rows(cmd["quick"])[cmd["setup"]]
            torch.manual_seed(0)
            module = make()
            x = torch.randn(cmd["m"], *shape)
            with torch.no_grad():
                gy = torch.randn(module(x).shape)
            plan = tengrad.compile(module)
            sized = plan.sized(x.shape, gy.shape)
            avail = {}
            for o in ORDERS:
                if o not in plan.orders("gram"):
                    avail[o] = "-"
                else:
                    avail[o] = "cap" if sized.cost("gram", o).memory * 4 > cmd["max_gib"] * 2**30 else "ok"
            state.update(plan=plan, x=x, gy=gy)
            reply = {"name": name, "chosen": sized.choice["gram"], "avail": avail, "file": tengrad.__file__}
        else:
            plan, x, gy = state["plan"], state["x"], state["gy"]
            start = clock()
            plan.gram(x, gy, order=cmd["order"])
            reply = {"t": clock() - start}
        print(json.dumps(reply), flush=True)


class Side:
    def __init__(self, tree: str, threads: int | None, clock: str):
        env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), GRAM_COMPARE_CLOCK=clock)
        if threads:
            env["GRAM_COMPARE_THREADS"] = str(threads)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--before", required="--worker" not in (argv or sys.argv))
    ap.add_argument("--after", default=".")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-gib", type=float, default=6.0)
    ap.add_argument("--max-seconds", type=float, default=math.inf)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args(argv)
    if args.worker:
        worker()
        return 0
    sys.path.insert(0, HERE)
    from common import machine
    from gram import rows

    batches = args.batch or ([4] if args.quick else [32, 128])
    before, after = Side(args.before, args.threads, args.clock), Side(args.after, args.threads, args.clock)
    print(f"machine: {machine()}; float32; {args.threads or 'default'} threads per worker; {args.clock} clock; "
          f"load {os.getloadavg()[0]:.1f} at start; median of {args.repeats} interleaved calls after one warm-up each")
    head = "| layer | m | order | before | after | after / before |"
    print(head + "\n" + "|---" * 6 + "|", flush=True)
    worst = 0.0
    for idx in range(len(rows(args.quick))):
        for m in batches:
            setup = dict(setup=idx, m=m, quick=args.quick, max_gib=args.max_gib)
            info_b, info_a = before.ask(**setup), after.ask(**setup)
            for order in (None, *ORDERS):
                label = f"plan.gram ({info_b['chosen']} / {info_a['chosen']})" if order is None else order
                if order is not None and (info_b["avail"][order] != "ok" or info_a["avail"][order] != "ok"):
                    print(f"| {info_a['name']} | {m} | {label} | {info_b['avail'][order]} | "
                          f"{info_a['avail'][order]} | |", flush=True)
                    continue
                warm = before.ask(order=order)["t"], after.ask(order=order)["t"]
                if order is not None and max(warm) > args.max_seconds:
                    print(f"| {info_a['name']} | {m} | {label} | slow | slow | |", flush=True)
                    continue
                tb, ta = [], []
                for _ in range(args.repeats):
                    tb.append(before.ask(order=order)["t"])
                    ta.append(after.ask(order=order)["t"])
                mb, ma = statistics.median(tb), statistics.median(ta)
                worst = max(worst, ma / mb)
                print(f"| {info_a['name']} | {m} | {label} | {mb * 1e3:.1f} ms | {ma * 1e3:.1f} ms | "
                      f"{ma / mb:.2f} |", flush=True)
    print(f"\nworst after / before: {worst:.2f}; load {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
