"""The first steps of 3C1F-32 on Fashion-MNIST (30,000 images, batch 128) with and without prior="adam":
the minibatch loss, the KL-clip factor nu and the noise ratio every 5 steps, per arm (docs/experiments/lm-prior.md).

    .venv/bin/python lab/prior_stability.py --steps 41
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import tengrad  # noqa: E402
from tasks import fmnist_3c1f  # noqa: E402

ARMS = {"defaults": {}, "prior": dict(prior="adam"), "prior, floor 0.3": dict(prior="adam", prior_floor=0.3),
        "prior, floor 1": dict(prior="adam", prior_floor=1.0), "prior, update_freq 1": dict(prior="adam", update_freq=1),
        "prior, kl_clip 1e-3": dict(prior="adam", kl_clip=1e-3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=41)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = fmnist_3c1f.task(train=30000, test=2000)
    data = task.load()
    for name, kw in ARMS.items():
        rows = first_steps(task, data, kw, args.steps)
        print(json.dumps({"arm": name, "options": kw, "(step, loss, nu, r)": rows}))
    return 0


def first_steps(task, data, options: dict, steps: int) -> list[tuple]:
    """(step, minibatch loss, nu, noise ratio) every 5 steps of TENGraD(**options) from seed 0's model and batches."""
    torch.manual_seed(0)
    model = task.model()
    opt = tengrad.TENGraD(model, weight_decay=1e-3, **options)
    batches = task.batches(data, 0)
    rows = []
    for s in range(steps):
        x, y = next(batches)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if s % 5 == 0:
            rows.append((s, round(loss.item(), 3), round(opt.last_nu, 4), round(opt.estimator.noise_ratio, 3)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
