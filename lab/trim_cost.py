"""A/B of handing the freed heap back during a curvature step (glibc malloc_trim, the removed
curvature/release.py): every trim (per block and at the end), the final one only, none; curvature steps
(update_freq=1) against SGD in one process, interleaved. Run at the commit before the removal (c. a5322cc):

    .venv/bin/python -W ignore lab/trim_cost.py resnet18 11    # also: wrn 7, vit_tiny 7
"""
import sys, warnings, time, statistics
import os
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import torch, torch.nn.functional as F
torch.set_num_threads(2)
import tengrad
from tengrad.optim.curvature import release
orig_now = release.Trim.now
mode = {"v": "all"}
def now(self, force=False):
    if mode["v"] == "all" or (mode["v"] == "final" and self.every == 0):
        return orig_now(self, force)
release.Trim.now = now
which = sys.argv[1]
if which == "wrn":
    from tasks.fmnist_resnet import WideResNet
    x = torch.randn(128, 1, 28, 28); y = torch.randint(0, 10, (128,))
    def mk(): torch.manual_seed(0); return WideResNet(12, 2)
    loss = F.cross_entropy
else:
    from zoo_models import build
    factory, x, y, loss, _ = build(which)
    mk = factory
ms = {}
a = mk(); ms["sgd"] = (a, torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), "all")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for v in ("all", "final", "none"):
        a = mk(); ms["upd_" + v] = (a, tengrad.TENGraD(a, update_freq=1), v)
T = {k: [] for k in ms}
def step(k):
    m, o, v = ms[k]
    mode["v"] = v
    t0 = time.perf_counter(); o.zero_grad(); loss(m(x), y).backward(); o.step()
    return time.perf_counter() - t0
for k in ms:
    for _ in range(2): step(k)
for r in range(int(sys.argv[2])):
    for k in (list(ms) if r % 2 else list(ms)[::-1]):
        T[k].append(step(k))
s = statistics.median(T["sgd"])
for k in ms: print(which, k, f"{statistics.median(T[k])*1e3:.1f} ms {statistics.median(T[k])/s:.2f}x")
