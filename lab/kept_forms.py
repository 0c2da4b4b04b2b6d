"""Per block of a zoo model after one TENGraD curvature step (k = 10): the kept form and its bytes, and the
other form's bytes (J: r P; x and gy: their sizes).  PYTHONPATH=. python lab/kept_forms.py vit_tiny"""
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import torch  # noqa: E402
from zoo_models import build  # noqa: E402
import tengrad  # noqa: E402
from tengrad.optim.curvature import memory  # noqa: E402

name = sys.argv[1]
c = int(sys.argv[2]) if len(sys.argv) > 2 else "auto"
factory, x, y, loss, _ = build(name)
model = factory()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    opt = tengrad.TENGraD(model, 1e-3, 1.0, momentum=0.9, update_freq=10, curvature_batch=c)
opt.zero_grad()
loss(model(x), y).backward()
opt.step()
tot = {}
for b in opt.blocks:
    cv = b.curv
    if cv is None:
        continue
    r = cv.rows
    kept = memory.kept_bytes(r)
    J = r.n_rows * b.numel * 4
    path = "J" if r.explicit_held else "xgy"
    tot[path] = tot.get(path, 0) + kept
    print(f"{b.name:30s} {path:4s} P {b.numel:9d} kept {kept / 2**20:8.2f} MB  J-form {J / 2**20:8.2f} MB  rows {r.n_rows}")
print({k: f"{v / 2**20:.1f} MB" for k, v in tot.items()})
