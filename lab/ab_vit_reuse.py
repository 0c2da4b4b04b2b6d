"""ViT-tiny reuse steps, one thread, interleaved: TENGraD defaults vs the old J path vs rows only, and SGD.
    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python lab/ab_vit_reuse.py"""
import sys, time, warnings
sys.path.insert(0, "/work/wt-mem/benchmarks")
import torch
torch.set_num_threads(1)
from zoo_models import build
import tengrad
factory, x, y, loss, _ = build("vit_tiny")
arms = {}
for name, kw in [("default", {}), ("old (None, None)", dict(curvature_batch=None, curvature_memory=None)),
                 ("rows only (memory None)", dict(curvature_memory=None))]:
    m = factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = tengrad.TENGraD(m, 1e-3, 1.0, momentum=0.9, update_freq=10**9, **kw)
    arms[name] = (m, o)
sg = factory(); so = torch.optim.SGD(sg.parameters(), lr=1e-3, momentum=0.9)
arms["sgd"] = (sg, so)
def step(m, o):
    o.zero_grad(); loss(m(x), y).backward(); o.step()
for m, o in arms.values():
    step(m, o); step(m, o)
T = {k: [] for k in arms}
for r in range(4):
    for k, (m, o) in arms.items():
        t = time.perf_counter(); step(m, o); T[k].append(time.perf_counter() - t)
for k, v in T.items():
    v.sort(); print(f"{k:28s} reuse step median {v[len(v)//2]*1e3:7.1f} ms")
