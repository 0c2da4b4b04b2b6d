"""Generated Triton kernels vs the torch backend vs torch.func, on one GPU.

Method: for each layer below at m = 128 samples, x and the per-sample output gradients gy are
standard normal float32 on the GPU. Every quantity is first checked against the torch backend
(``TermRun``, the reference; rel err <= 1e-3 with ``--precision ieee``), then timed with
``triton.testing.do_bench`` (25 ms warm-up, 100 ms of repeats, the median; autotuning happens in
the correctness pass, before timing). A layer's time is the sum over its terms (weight and bias).
The torch.func column is the per-sample Gram from ``vmap(grad)`` per-sample gradients, then J J^T.
Orders whose closed-form cost exceeds ``--max-flops`` (or, for the torch factored order, whose
covariance tensors exceed ``--max-bytes``) are not run and print ``skip``: e.g. the factored Gram of
a 3x3 conv on 28x28 at m = 128 is ~1e16 flops (Corollary 2: that is why the plan picks direct).

    python benchmarks/gpu.py              # full sizes (needs CUDA)
    python benchmarks/gpu.py --tiny       # tiny sizes under TRITON_INTERPRET=1, on CPU (CI smoke test)

Record the GPU model, driver and triton/torch versions with the table when you quote it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes under the Triton interpreter (CPU)")
    ap.add_argument("--m", type=int, default=None, help="batch size (default 128, tiny: 3)")
    ap.add_argument("--precision", default="ieee", choices=("ieee", "tf32"), help="tl.dot input precision")
    ap.add_argument("--max-flops", type=float, default=2e13)
    ap.add_argument("--max-bytes", type=float, default=16e9)
    return ap.parse_args(argv)


ARGS = parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.tiny:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402
from torch import nn  # noqa: E402

import tengrad  # noqa: E402
from tengrad.codegen.triton import TritonTermRun  # noqa: E402

FULL = [
    ("Conv2d(128,128,3,p=1) 28x28", lambda: nn.Conv2d(128, 128, 3, padding=1), (128, 28, 28)),
    ("Conv2d(256,256,3,p=1) 4x4", lambda: nn.Conv2d(256, 256, 3, padding=1), (256, 4, 4)),
    ("Linear(1024,1024)", lambda: nn.Linear(1024, 1024), (1024,)),
    ("Linear(512,512) seq 128", lambda: nn.Linear(512, 512), (128, 512)),
    ("Linear(1024,1024) seq 128", lambda: nn.Linear(1024, 1024), (128, 1024)),
]
TINY = [
    ("Conv2d(3,4,3,p=1) 6x5", lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 6, 5)),
    ("Linear(6,5) seq 3", lambda: nn.Linear(6, 5, bias=False), (3, 6)),
]


def cpu_median(fn, reps: int = 1) -> float:
    """The interpreter has no CUDA events: median wall time of a few calls (one by default), in ms."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(fn) -> float:
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return cpu_median(fn)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def per_sample_gram(mod: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """torch.func: per-sample gradients of <gy_i, mod(x_i)>, flattened, then J J^T."""
    params = {k: v.detach() for k, v in mod.named_parameters()}

    def loss(p, xi, gi):
        return (torch.func.functional_call(mod, p, (xi[None],)) * gi[None]).sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, gy)
    j = torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], dim=1)
    return j @ j.T


def run_case(label, make, shape, m, device, args, rows):
    torch.manual_seed(0)
    mod = make().to(device)
    x = torch.randn((m,) + shape, device=device)
    gy = torch.randn(mod(x).shape, device=device)
    plan = tengrad.compile(mod)
    _, runs = plan._runs(x, gy)
    pairs = [(r, TritonTermRun(r.spec, r.sizes, r.x, r.g, precision=args.precision), sp) for r, sp in runs]
    p = [torch.randn(q.shape, device=device) for _, q in plan.params]
    u = torch.randn(m, device=device)
    tol = 1e-3 if args.precision == "ieee" else 2e-2

    def feasible(sp, q, order, torch_side):
        c = sp.cost(q, order)
        if c.flops > args.max_flops:
            return False
        return not (torch_side and c.memory * 4 > args.max_bytes)

    k_ref = sum(r.gram("direct") for r, _, _ in pairs)
    func_err = rel(per_sample_gram(mod, x, gy), k_ref)
    t_func = bench(lambda: per_sample_gram(mod, x, gy))
    quantities = [
        ("gram", "direct", lambda run, _pt: run.gram("direct"), k_ref),
        ("gram", "factored", lambda run, _pt: run.gram("factored"), k_ref),
        ("jvp", "forward", lambda run, pt: run.jvp(pt, "forward"), None),
        ("vjp", "weight_grad", lambda run, _pt: run.vjp(u, "weight_grad"), None),
    ]
    for q, order, call, want in quantities:
        if not all(feasible(sp, q, order if order in [o.name for o in sp.orders[q]] else "direct", False)
                   for _, _, sp in pairs):
            rows.append((label, f"{q} {order}", None, None, t_func if q == "gram" else None, None, "skip (cost)"))
            continue
        tri = lambda: [call(t, pt) for (_, t, _), pt in zip(pairs, p)]  # noqa: E731
        ref = lambda: [call(r, pt) for (r, _, _), pt in zip(pairs, p)]  # noqa: E731
        got = tri()
        if q == "gram":
            err = rel(sum(got), want)
        elif q == "jvp":
            err = rel(sum(got), sum(r.jvp(pt, "direct") for (r, _, _), pt in zip(pairs, p)))
        else:
            err = max(rel(a, r.vjp(u, "direct")) for a, (r, _, _) in zip(got, pairs))
        status = "ok" if err <= tol else f"FAIL > {tol:g}"
        torch_ok = all(feasible(sp, q, order, True) for _, _, sp in pairs)
        t_torch = bench(ref) if torch_ok else None
        t_tri = bench(tri)
        if q == "gram" and func_err > 1e-3:
            status += f"; torch.func FAIL {func_err:.1e}"
        rows.append((label, f"{q} {order}", t_torch, t_tri, t_func if q == "gram" else None, err, status))


def fmt(t):
    return "-" if t is None else f"{t:10.3f}"


def main(args) -> int:
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cpu" and not args.tiny:
        print("no CUDA device: run with --tiny for the interpreter smoke test", file=sys.stderr)
        return 2
    m = args.m or (3 if args.tiny else 128)
    rows: list = []
    for label, make, shape in (TINY if args.tiny else FULL):
        run_case(label, make, shape, m, device, args, rows)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (TRITON_INTERPRET=1)"
    print(f"tengrad triton backend, m={m}, float32, tl.dot precision {args.precision}, {name}, "
          f"torch {torch.__version__}, triton {triton.__version__}; times: median ms "
          "(torch: the torch backend's TermRun; torch.func: vmap(grad) per-sample Gram; speedup: torch / triton)")
    head = (f"{'layer':28s} {'quantity / order':20s} {'torch':>10s} {'triton':>10s} {'torch.func':>10s} "
            f"{'speedup':>8s} {'rel err':>9s}  check")
    print(head)
    print("-" * len(head))
    failed = False
    for label, what, t_torch, t_tri, t_func, err, status in rows:
        speed = f"{t_torch / t_tri:8.2f}" if t_torch and t_tri else f"{'-':>8s}"
        e = f"{err:9.1e}" if err is not None else f"{'-':>9s}"
        print(f"{label:28s} {what:20s} {fmt(t_torch):>10s} {fmt(t_tri):>10s} {fmt(t_func):>10s} {speed} {e}  {status}")
        failed |= "FAIL" in status
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
