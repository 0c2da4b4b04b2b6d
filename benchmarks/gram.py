"""plan.gram against the torch.func per-sample Gram and against each fixed evaluation order.

Method: float32 on this CPU; every timing is the median of ``--repeats`` runs after one warm-up,
all in one process so that the ratios hold on a noisy machine. The torch.func baseline is
``vmap(grad(<gy_i, module(x_i)>))`` over the samples (per-sample gradients of all parameters),
then ``J @ J.T``. Orders whose extra memory exceeds ``--max-gib`` are not run (marked "cap").
The achieved rate is the chosen order's model FLOPs over its time, against the measured rate of
one 2048^3 matmul.

    python benchmarks/gram.py                # the table of benchmarks/README.md
    python benchmarks/gram.py --quick        # tiny smoke run
    python benchmarks/gram.py --set convt --batch 32   # transposed convolutions (output maps)
"""
from __future__ import annotations

import argparse
import math

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import tengrad
from common import machine, matmul_rate, median_time


def torch_func_gram(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    params = {k: v.detach() for k, v in module.named_parameters()}

    def inner(p, xi, gi):
        return (functional_call(module, p, (xi[None],))[0] * gi).sum()

    grads = vmap(grad(inner), in_dims=(None, 0, 0))(params, x, gy)
    j = torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], 1)
    return j @ j.T


def rows(quick: bool, which: str = "paper"):
    if which == "convt":   # DCGAN-style upsampling layers and a stride-1 one
        return [("ConvTranspose2d(32,16,4,s=2,p=1) 8x8", lambda: nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1),
                 (32, 8, 8)),
                ("ConvTranspose2d(16,8,3,p=1) 16x16", lambda: nn.ConvTranspose2d(16, 8, 3, padding=1), (16, 16, 16)),
                ("ConvTranspose1d(64,64,4,s=2,p=1) 32", lambda: nn.ConvTranspose1d(64, 64, 4, stride=2, padding=1),
                 (64, 32))]
    if quick:
        return [("Conv2d(8,8,3,p=1) 8x8", lambda: nn.Conv2d(8, 8, 3, padding=1), (8, 8, 8)),
                ("Linear(32,32) seq 6", lambda: nn.Linear(32, 32), (6, 32))]
    return [("3C1F Conv2d(128,128,3,p=1) 28x28", lambda: nn.Conv2d(128, 128, 3, padding=1), (128, 28, 28)),
            ("late Conv2d(256,256,3,p=1) 4x4", lambda: nn.Conv2d(256, 256, 3, padding=1), (256, 4, 4)),
            ("Linear(1024,1024) 2-D", lambda: nn.Linear(1024, 1024), (1024,)),
            ("Linear(512,512) seq 128", lambda: nn.Linear(512, 512), (128, 512))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-gib", type=float, default=6.0)
    ap.add_argument("--set", choices=("paper", "convt"), default="paper", help="which layers to time")
    args = ap.parse_args(argv)
    batches = args.batch or ([4] if args.quick else [32, 128])
    torch.manual_seed(0)
    peak = matmul_rate(512 if args.quick else 2048)
    print(f"machine: {machine()}; float32; matmul rate {peak / 1e9:.1f} GFLOP/s; median of {args.repeats} after warm-up\n")
    head = ("| layer | m | torch.func | plan.gram (chosen) | direct | factored | factored_raw "
            "| vs torch.func | chosen / best fixed | chosen GFLOP/s (% of matmul) |")
    print(head)
    print("|" + "|".join(["---"] * (head.count("|") - 1)) + "|")
    for name, make, shape in rows(args.quick, args.set):
        module = make()
        for m in batches:
            x = torch.randn(m, *shape)
            with torch.no_grad():
                gy = torch.randn(module(x).shape)
            plan = tengrad.compile(module)
            sized = plan.sized(x.shape, gy.shape)
            ref = torch_func_gram(module, x, gy)
            k = plan.gram(x, gy)
            err = ((k - ref).norm() / ref.norm()).item()
            assert err < 1e-4, f"{name}: plan.gram disagrees with torch.func (rel err {err:.2e})"
            t_func = median_time(lambda: torch_func_gram(module, x, gy), args.repeats)
            t_plan = median_time(lambda: plan.gram(x, gy), args.repeats)
            fixed = {}
            for order in ("direct", "factored", "factored_raw"):
                if order not in plan.orders("gram"):
                    fixed[order] = None
                    continue
                cost = sized.cost("gram", order)
                if cost.memory * 4 > args.max_gib * 2**30:
                    fixed[order] = math.inf
                    continue
                fixed[order] = median_time(lambda: plan.gram(x, gy, order=order), args.repeats)
            best = min(t for t in fixed.values() if t is not None)
            chosen = sized.choice["gram"]
            flops = sized.cost("gram", None).flops
            cell = lambda t: "-" if t is None else ("cap" if math.isinf(t) else f"{t * 1e3:.1f} ms")  # noqa: E731
            print(f"| {name} | {m} | {t_func * 1e3:.1f} ms | {t_plan * 1e3:.1f} ms ({chosen}) | "
                  + " | ".join(cell(fixed[o]) for o in ("direct", "factored", "factored_raw"))
                  + f" | {t_func / t_plan:.1f}x | {t_plan / best:.2f} | {flops / t_plan / 1e9:.1f} "
                  f"({100 * flops / t_plan / peak:.0f}%) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
