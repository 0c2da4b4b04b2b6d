"""Mean step time of TENGraD's defaults (prior="soap", step_rule="adam") and of the paper's step (prior=None)
against AdamW on benchmarks/zoo_models.py's models, interleaved in one process: 30 steps per arm, the
last 20 averaged (two update_freq cycles with their curvature steps and basis refreshes), 1 thread.

    .venv/bin/python lab/zoo_rule_cost.py resnet18,vit_tiny,gpt,mlp4096 1
"""
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, __file__.rsplit("/lab/", 1)[0] + "/benchmarks")
sys.path.insert(0, __file__.rsplit("/lab/", 1)[0])
warnings.simplefilter("ignore")
from zoo_models import build  # noqa: E402
import tengrad  # noqa: E402

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
for name in sys.argv[1].split(","):
    factory, x, y, loss, _ = build(name)
    arms = {}
    for meth in ("adamw", "defaults", "paper"):
        m = factory()
        opt = (torch.optim.AdamW(m.parameters(), lr=1e-4) if meth == "adamw"
               else tengrad.TENGraD(m) if meth == "defaults" else tengrad.TENGraD(m, prior=None))
        arms[meth] = (m, opt, [])
    for it in range(30):
        for meth, (m, opt, ts) in arms.items():
            t0 = time.perf_counter()
            opt.zero_grad()
            loss(m(x), y).backward()
            opt.step()
            if it >= 10:
                ts.append(time.perf_counter() - t0)
    base = statistics.mean(arms["adamw"][2])
    print(name, " ".join(f"{k} mean {1000 * statistics.mean(ts):.0f} ms ({statistics.mean(ts) / base:.2f}x) "
                         f"max {1000 * max(ts):.0f}" for k, (_, _, ts) in arms.items()), flush=True)
