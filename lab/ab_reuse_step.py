"""One zoo model's reuse step against SGD's in one process, interleaved (order alternating each round),
median full step (zero_grad, forward, backward, step) of each: the A/B of two code versions is this run
alternately from two checkouts (lab/ab_reuse_f97d1cc.txt).

    PYTHONPATH=. .venv/bin/python lab/ab_reuse_step.py resnet18 21
    cd /work/wt-old && PYTHONPATH=/work/wt-old /work/main/.venv/bin/python /work/main/lab/ab_reuse_step.py resnet18 21
"""
import os
import sys, time, warnings, statistics
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import torch
torch.set_num_threads(2)
from zoo_models import build
import tengrad
name = sys.argv[1]
factory, x, y, loss, _ = build(name)
m = factory()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    o = tengrad.TENGraD(m, 1e-3, 1.0, momentum=0.9, update_freq=10**9)
sg = factory(); so = torch.optim.SGD(sg.parameters(), lr=1e-3, momentum=0.9)
def step(m, o):
    o.zero_grad(); loss(m(x), y).backward(); o.step()
for _ in range(3): step(m, o); step(sg, so)
T = {"sgd": [], "tengrad": []}
for r in range(int(sys.argv[2]) if len(sys.argv) > 2 else 15):
    for k, (mm, oo) in (("sgd", (sg, so)), ("tengrad", (m, o))) if r % 2 else (("tengrad", (m, o)), ("sgd", (sg, so))):
        t = time.perf_counter(); step(mm, oo); T[k].append(time.perf_counter() - t)
s, t = statistics.median(T["sgd"]), statistics.median(T["tengrad"])
print(f"{name}: sgd {s*1e3:.1f} ms, tengrad reuse {t*1e3:.1f} ms, ratio {t/s:.3f}")
line = [l.strip() for l in o.explain().splitlines() if "memory budget" in l]
print("   ", line[0][:200] if line else "(no budget line)")
