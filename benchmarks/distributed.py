"""Data-parallel step time and bytes: DDP+SGD, TENGraD "exact" and "local" on 1, 2, 3 gloo processes (CPU).

    PYTHONPATH=. .venv/bin/python benchmarks/distributed.py [--ranks 1,2,3] [--steps 5] [--batch 48]

Measured (strong scaling: a fixed global batch split evenly over the ranks): per (model, method,
ranks), one process group of that size (file:// rendezvous, gloo, 1 torch thread per rank), 2 warm-up
steps, then the median over ``--steps`` steps of the slowest rank's time per step (forward, backward,
step), and the bytes rank 0 handed to collectives per step (TENGraD counts its own: status, gradient,
payloads, u, J^T u; DDP's gradient all-reduce is the parameter bytes). Plain models for TENGraD (the
optimizer reduces gradients), DDP for SGD. One rank: TENGraD runs single-process (distributed=None).

Projected (``--project``): the communication and owner work that the exact step adds per step at
R = 8, 64, 512 GPUs with ``--per-gpu`` samples each (weak scaling), from the blocks' real shapes
and the same exchange/owner rules the optimizer uses (distributed_plan.py), under stated link
bandwidth, latency and GPU rate; next to DDP's gradient all-reduce and K-FAC's factor all-reduce.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


# ------------------------------------------------------------------ models
def transformer_like(vocab=200, d=32, ff=64, classes=10):
    """Embedding -> LayerNorm -> Linear(d, ff) -> GELU -> Linear(ff, d) -> LayerNorm -> mean -> Linear.
    (nn.MultiheadAttention is not supported by TENGraD yet; the token-wise layers are.)"""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.norm1 = nn.LayerNorm(d)
            self.up = nn.Linear(d, ff)
            self.down = nn.Linear(ff, d)
            self.norm2 = nn.LayerNorm(d)
            self.head = nn.Linear(d, classes)

        def forward(self, ids):                         # ids [m, T]
            h = self.norm1(self.emb(ids))
            h = self.norm2(h + self.down(torch.nn.functional.gelu(self.up(h))))
            return self.head(h.mean(1))

    return Net()


def make(model_name: str, batch: int, seed: int = 0):
    import torch

    from tengrad.demo.model import three_c_one_f

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if model_name == "3c1f":
        model = three_c_one_f(width=16, hidden=128)
        x = torch.randn(batch, 1, 28, 28, generator=gen)
    else:
        model = transformer_like()
        x = torch.randint(0, 200, (batch, 16), generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return model, x, y


# ------------------------------------------------------------------ measurement (one process group)
def _rank_main(rank, world, init, args, out):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    from tengrad import TENGraD

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    rows = []
    for model_name in ("3c1f", "transformer"):
        for method in ("ddp+sgd", "tengrad-exact", "tengrad-local"):
            if world == 1 and method == "tengrad-local":
                continue
            model, x, y = make(model_name, args.batch)
            share = args.batch // world
            xb, yb = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
            if method == "ddp+sgd":
                net = nn.parallel.DistributedDataParallel(model)
                opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            else:
                net = model
                mode = None if world == 1 else method.split("-")[1]
                opt = TENGraD(model, 0.1, 1.0, distributed=mode, prior=None)
            times = []
            for s in range(2 + args.steps):
                dist.barrier()
                t0 = time.perf_counter()
                opt.zero_grad()
                F.cross_entropy(net(xb), yb).backward()
                opt.step()
                t = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                if s >= 2:
                    times.append(float(t))
            grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            strat = opt.estimator if getattr(opt, "distributed", False) else None
            sent = strat.traffic.total if strat is not None else (grad_bytes if world > 1 else 0)
            rows.append((model_name, method, world, 1000 * statistics.median(times), sent))
    dist.destroy_process_group()
    if rank == 0:
        out.put(rows)


def measure(world: int, args) -> list:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank_main, args=(r, world, os.path.join(tmp, "rdv"), args, out))
                 for r in range(world)]
        for p in procs:
            p.start()
        rows = out.get(timeout=1800)
        for p in procs:
            p.join(timeout=60)
    return rows


# ------------------------------------------------------------------ projection
def block_shapes(model_name: str, m: int):
    """[(name, plan, P, x_shape, gy_shape, x itemsize, kfac factor numbers)] for batch m."""
    import torch

    from tengrad import TENGraD

    model, x, y = make(model_name, m)
    opt = TENGraD(model, 0.1, 1.0, distributed=None, prior=None)
    shapes = {}
    hooks = [b.module.register_forward_hook(
        lambda mod, inp, outp, name=b.name: shapes.__setitem__(name, (inp[0], outp))) for b in opt.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    res = []
    for b in opt.blocks:
        xin, yout = shapes[b.name]
        mod = b.module
        if isinstance(mod, torch.nn.Conv2d):
            a = mod.in_channels // mod.groups * math.prod(mod.kernel_size) + (mod.bias is not None)
            kfac = a * a + mod.out_channels ** 2
        elif isinstance(mod, torch.nn.Linear):
            a = mod.in_features + (mod.bias is not None)
            kfac = a * a + mod.out_features ** 2
        else:   # LayerNorm / Embedding: K-FAC practice keeps them diagonal (P numbers)
            kfac = b.numel
        res.append((b.name, b.plan, b.numel, tuple(xin.shape), tuple(yout.shape), xin.element_size(), kfac))
    return res


def project(model_name: str, per_gpu: int, ranks: list[int], bw: float, lat: float, rate: float):
    from tengrad.optim.estimator import owners as dplan

    blocks = block_shapes(model_name, per_gpu)
    P = sum(b[2] for b in blocks)
    lines = []
    for R in ranks:
        sizes = [per_gpu] * R
        M = per_gpu * R
        ex = [dplan.choose(plan, xs, gs, xi, 4, 1, sizes, n, 2 ** 40) for _, plan, n, xs, gs, xi, _ in blocks]
        owners = dplan.assign_owners([e.owner_flops for e in ex], R)
        per_owner = {}
        for e, o in zip(ex, owners):   # receive payloads over the owner's link, then Gram + Cholesky
            per_owner[o] = per_owner.get(o, 0.0) + (R - 1) * e.bytes / bw + e.owner_flops / rate
        t_owner = max(per_owner.values())
        hops = math.ceil(math.log2(R))
        # all-reduce: ring bandwidth term, tree latency term (what NCCL's algorithms reach)
        allreduce = lambda nbytes: 2 * (R - 1) / R * nbytes / bw + 2 * hops * lat   # noqa: E731
        tree = lambda nbytes: hops * (nbytes / bw + lat)                             # noqa: E731
        t_grad = allreduce(4 * P)
        t_small = len(blocks) * (tree(4 * M) + tree(4 * M)) + tree(16 * len(blocks) * R)  # J g, u, status
        t_exact = t_grad + t_owner + t_small + allreduce(4 * P)
        solve = {}
        for o in owners:
            solve[o] = solve.get(o, 0.0) + 2.0 * M * M / rate
        t_reuse = t_grad + max(solve.values()) + t_small + allreduce(4 * P)
        t_local = t_grad + allreduce(4 * P)
        t_kfac = allreduce(4 * sum(b[6] for b in blocks))
        lines.append((model_name, R, M, t_grad, t_exact, t_owner, t_reuse, t_local, t_kfac,
                      sum(e.bytes for e in ex), [e.form for e in ex]))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="1,2,3")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=48, help="global batch (divisible by every rank count)")
    ap.add_argument("--project", action="store_true", help="only the projection (no measurement)")
    ap.add_argument("--per-gpu", type=int, default=32)
    ap.add_argument("--bandwidth", type=float, default=25e9, help="bytes/s per GPU link (200 Gb/s IB)")
    ap.add_argument("--latency", type=float, default=10e-6, help="s per message hop")
    ap.add_argument("--rate", type=float, default=20e12, help="FLOP/s of an owner's Gram/Cholesky")
    args = ap.parse_args()
    from benchmarks.common import machine

    print(f"machine: {machine()}")
    if not args.project:
        print(f"\nmeasured, global batch {args.batch} split evenly, float32, gloo on this CPU, 1 thread/rank")
        print("| model | method | ranks | ms/step (median, slowest rank) | bytes/step sent by rank 0 |")
        print("|---|---|---|---|---|")
        for world in [int(r) for r in args.ranks.split(",")]:
            for model_name, method, R, ms, sent in measure(world, args):
                print(f"| {model_name} | {method} | {R} | {ms:.1f} | {sent:,} |", flush=True)
    print(f"\nprojected extra time per step, {args.per_gpu} samples per GPU, link {args.bandwidth / 1e9:g} GB/s, "
          f"latency {args.latency * 1e6:g} us, owner rate {args.rate / 1e12:g} TFLOP/s (float32)")
    print("| model | GPUs | M | DDP grad all-reduce | TENGraD exact, curvature step | of which owners | "
          "exact, reuse step | TENGraD local | K-FAC factor all-reduce | payload/rank per curvature step | "
          "exchange per block |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model_name in ("3c1f", "transformer"):
        for (name, R, M, tg, te, to, tr, tl, tk, pay, forms) in project(
                model_name, args.per_gpu, [8, 64, 512], args.bandwidth, args.latency, args.rate):
            ms = lambda t: f"{1000 * t:.2f} ms"   # noqa: E731
            print(f"| {name} | {R} | {M} | {ms(tg)} | {ms(te)} | {ms(to)} | {ms(tr)} | {ms(tl)} | {ms(tk)} | "
                  f"{pay / 1e6:.2f} MB | {','.join(f[0] for f in forms)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
