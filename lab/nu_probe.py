"""The KL clip's factor nu and the noise ratio over the first 300 steps of the tta resnet task at
TENGraD's defaults (20,000 training images): does the clip bind? (benchmarks/README.md, tta section)

    .venv/bin/python -W ignore lab/nu_probe.py
"""
import os
import sys, warnings
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import torch, torch.nn.functional as F
torch.set_num_threads(2)
import tasks, tengrad
task = tasks.get("resnet", train=20000, test=1000)
data = task.load()
torch.manual_seed(0); m = task.model()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    o = tengrad.TENGraD(m)
print({k: v for k, v in o.defaults.items() if k in ("lr", "damping", "kl_clip", "update_freq", "momentum")}, "noise_scale", o.noise_scale)
b = task.batches(data, 0)
for s in range(1, 301):
    x, y = next(b)
    o.zero_grad(); l = F.cross_entropy(m(x), y); l.backward(); o.step()
    if s % 25 == 0:
        print(s, f"loss {l.item():.3f} nu {o.last_nu:.4f} noise_ratio {o.estimator.noise_ratio:.3f} lr*nu {o.param_groups[0]['lr']*o.last_nu:.4f}")
