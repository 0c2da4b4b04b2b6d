"""The prior's normalisation on 3C1F-32 (30,000 Fashion-MNIST images, batch 128): delta = sqrt(v) / c per
block with c the block's mean of sqrt(v) (prior.py), its median, or its geometric mean; the minibatch loss
and the KL-clip factor nu every 5 steps per arm (lab/prior_stability.py's protocol; docs/experiments/lm-prior.md).

    .venv/bin/python lab/prior_norm.py --steps 61
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
sys.path.insert(0, os.path.dirname(__file__))
from tengrad.optim.curvature import prior  # noqa: E402
from tasks import fmnist_3c1f  # noqa: E402
from prior_stability import first_steps  # noqa: E402

MEAN = prior.diagonal


def centred(stat):
    def diagonal(vs, floor):
        s = [v.clamp(min=0).sqrt() for v in vs]
        flat = torch.cat([t.reshape(-1) for t in s])
        c = stat(flat)
        if not bool(c > 0):
            return MEAN(vs, floor)
        return [(t / c).clamp_(min=floor) for t in s]
    return diagonal


NORMS = {"mean": MEAN,
         "median": centred(lambda f: f.median()),
         "geometric mean": centred(lambda f: f.clamp(min=1e-30).log().mean().exp())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=61)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--norms", default="mean,median,geometric mean")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = fmnist_3c1f.task(train=30000, test=2000)
    data = task.load()
    for norm in ["none"] + args.norms.split(","):
        if norm != "none":
            prior.diagonal = NORMS[norm]
        rows = first_steps(task, data, {} if norm == "none" else dict(prior="adam"), args.steps)
        prior.diagonal = MEAN
        print(json.dumps({"prior normalised by": norm, "(step, loss, nu, r)": rows}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
