"""Step time of step_rule="adam" (prior="soap") against AdamW on the 3C1F and ResNet tasks' models, interleaved
in one process: median reuse and curvature steps (update_freq 10), and optionally a torch.profiler table
of the rule's reuse steps.

    .venv/bin/python lab/rule_step_cost.py --task resnet --steps 45 --threads 1 [--profile]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tengrad  # noqa: E402
from tasks.fmnist_resnet import WideResNet  # noqa: E402
from tengrad.demo.model import three_c_one_f  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from prior_step_cost import interleaved, report  # noqa: E402

RULE = dict(prior="soap", step_rule="adam", lr=3e-3, kl_clip=None, momentum=0.95, damping=0.1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="resnet", choices=["resnet", "3c1f"])
    ap.add_argument("--steps", type=int, default=45)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", choices=["reuse", "curvature"], default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (128,), generator=gen)
    make = (lambda: WideResNet(12, 2)) if args.task == "resnet" else (lambda: three_c_one_f(width=32, hidden=500))
    arms = {}
    for name, kw in [("AdamW", None), ("rule", RULE)]:
        torch.manual_seed(0)
        model = make()
        opt = torch.optim.AdamW(model.parameters(), 3e-3) if kw is None else tengrad.TENGraD(model, **kw)
        arms[name] = (model, opt)
    def step(model, opt):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    report(interleaved(arms, step, args.steps, warmup=15), "AdamW", f"{args.task}: threads {args.threads}")
    if args.profile:                                 # three steps of the kind asked, after the timed ones
        model, opt = arms["rule"]
        it, seen, prof = args.steps, 0, torch.profiler.profile()
        while seen < 3:
            want = (it % 10 == 0) == (args.profile == "curvature")
            if want:
                prof.start()
            step(model, opt)
            if want:
                prof.stop()
                seen += 1
            it += 1
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
