"""``torchrun --nproc_per_node=2 -m tengrad demo --distributed``: 3C1F data-parallel with gloo on the CPU.

Every rank loads the same data and draws the same global batches (``--batch-size`` samples, the last
batch of an epoch kept even when it is smaller); rank r trains on its contiguous share of each batch
(shares differ by one sample when the batch does not divide evenly: TENGraD's "exact" mode handles
uneven shares). The model is wrapped in DistributedDataParallel for every optimizer:

* SGD: DDP's gradient all-reduce (equal average over ranks), then torch.optim.SGD;
* TENGraD: ``distributed="exact"`` (the single-process step on the global batch; its DDP comm hook
  weights the gradient by the ranks' batch sizes), or ``"local"`` with ``--optimizers tengrad-local``.

Rank 0 evaluates on the test set after each epoch and prints the table; the training loss is the
global-batch mean (an all-reduce of sum and count). Bytes per step are what rank 0 handed to
collectives: TENGraD counts its own (``opt.explain()``) plus DDP's gradient all-reduce; SGD is DDP's.
Without torchrun (no WORLD_SIZE in the environment) it runs as a group of one.
"""
from __future__ import annotations

import math
import os
import tempfile
import time

OPTIMIZERS = ("sgd", "tengrad", "tengrad-local")


def _init() -> tuple[bool, object]:
    """(whether this call created the process group, a temporary folder to clean up or None)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False, None
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        return True, None
    tmp = tempfile.TemporaryDirectory()
    dist.init_process_group("gloo", init_method=f"file://{tmp.name}/rendezvous", rank=0, world_size=1)
    return True, tmp


def _shares(n: int, world: int) -> list[int]:
    base, extra = divmod(n, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def main_distributed(args) -> int:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    from tengrad import TENGraD

    from . import data as data_mod
    from .model import three_c_one_f
    from .train import evaluate

    created, keep = _init()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads if args.threads > 0 else 1)
    say = print if rank == 0 else (lambda *a, **k: None)
    names = [n.strip().lower() for n in args.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad:
        say(f"tengrad demo --distributed: unknown optimizer(s) {bad}; choose from {', '.join(OPTIMIZERS)}")
        return 2
    ds = data_mod.load(args.dataset, args.data_dir or data_mod.FASHION_DIR, seed=args.seed)
    x_tr, y_tr = data_mod.subset(ds.x_train, ds.y_train, args.train_subset, args.seed)
    x_te, y_te = data_mod.subset(ds.x_test, ds.y_test, args.test_subset, args.seed + 1)
    batch = min(args.batch_size, len(y_tr))
    steps_per_epoch = math.ceil(len(y_tr) / batch)
    say(f"Data set: {ds.describe()}; {len(y_tr)} training / {len(y_te)} test images; global batch {batch} "
        f"over {world} gloo rank(s) (shares {_shares(batch, world)}; last batch "
        f"{_shares(len(y_tr) - (steps_per_epoch - 1) * batch, world)}); 3C1F width {args.width}, hidden "
        f"{args.hidden}; {args.epochs} epoch(s); {torch.get_num_threads()} thread(s) per rank")

    rows = []
    for name in names:
        torch.manual_seed(args.seed)
        model = three_c_one_f(width=args.width, hidden=args.hidden)
        net = nn.parallel.DistributedDataParallel(model)
        if name == "sgd":
            opt = torch.optim.SGD(net.parameters(), lr=args.sgd_lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay)
            settings = f"lr={args.sgd_lr:g}"
        else:
            mode = "local" if name == "tengrad-local" else "exact"
            from tengrad.demo import tengrad_kwargs   # the settings given; the rest: TENGraD's defaults

            opt = TENGraD(net, weight_decay=args.weight_decay, fisher=args.fisher,
                          backend=args.backend, distributed=mode, **tengrad_kwargs(args))
            g = opt.param_groups[0]
            settings = f"lr={g['lr']:g}, damping={g['damping']:g}, {mode}"
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())   # DDP's all-reduce
        gen = torch.Generator().manual_seed(args.seed)
        steps, train_time, loss_sum, count = 0, 0.0, 0.0, 0
        for epoch in range(args.epochs):
            perm = torch.randperm(len(y_tr), generator=gen)
            loss_sum, count = 0.0, 0
            for s in range(steps_per_epoch):
                idx = perm[s * batch:(s + 1) * batch]
                shares = _shares(len(idx), world)
                start = sum(shares[:rank])
                xb, yb = x_tr[idx[start:start + shares[rank]]], y_tr[idx[start:start + shares[rank]]]
                t0 = time.perf_counter()
                opt.zero_grad()
                if name != "sgd" and args.fisher != "empirical":
                    loss = opt.backward(net(xb), yb, loss="cross_entropy")
                else:
                    loss = F.cross_entropy(net(xb), yb)
                    loss.backward()
                opt.step()
                train_time += time.perf_counter() - t0
                steps += 1
                loss_sum += float(loss.detach()) * len(yb)
                count += len(yb)
            tot = torch.tensor([loss_sum, float(count)], dtype=torch.float64)
            dist.all_reduce(tot)
            if rank == 0:
                _, acc = evaluate(model, x_te, y_te)
                say(f"  {name:>13} epoch {epoch + 1}: train loss {tot[0] / tot[1]:.4f}, test acc "
                    f"{100 * acc:.2f}%, {1000 * train_time / steps:.0f} ms/step")
        own = opt.estimator.bytes_sent if name != "sgd" and opt.distributed else 0
        per_step = ((own / steps if steps else 0) + grad_bytes) if world > 1 else 0.0
        if rank == 0:
            _, acc = evaluate(model, x_te, y_te)
            rows.append((name, settings, world, f"{float(tot[0] / tot[1]):.4f}", f"{100 * acc:.2f}%",
                         f"{1000 * train_time / steps:.0f}", f"{per_step / 1e6:.2f}"))
            if name == "tengrad":
                say(opt.explain())
    if rank == 0:
        head = ("optimizer", "settings", "ranks", "last-epoch train loss", "test acc", "ms/step",
                "MB sent/step (rank 0)")
        widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
        fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
        print("\n" + "\n".join([fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                               + [fmt.format(*r) for r in rows]))
    dist.barrier()
    if created:
        dist.destroy_process_group()
    if keep is not None:
        keep.cleanup()
    return 0
