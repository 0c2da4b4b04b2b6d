"""The LM task's first steps per optimizer, same initial weights and batches: training loss (mean of 15
steps), the KL clip's nu for TENGraD, and the median ms per step (docs/experiments/lm-prior-soap.md).
argv[1]: a Python list of dicts, each with "method" ("tengrad", or a peer of benchmarks/peers.py) and its
hyperparameters (fisher="mc": the step goes through opt.backward); argv[2] (optional): steps (150).

    .venv/bin/python lab/lm_prior_probe.py '[dict(method="tengrad", prior="soap"), dict(method="soap", lr=3e-3, weight_decay=0.01)]'
"""
import statistics
import sys
import time

import torch
sys.path.insert(0, "benchmarks")
from tasks.stdlib_lm import ByteLM, loss
from tasks import stdlib_corpus
import peers
train, val, meta = stdlib_corpus.load(max_bytes=3_000_000)


def run(method, steps, **kw):
    torch.manual_seed(0)
    m = ByteLM()
    if method == "tengrad":
        kw = {**dict(noise_scale=False, curvature_batch=None), **kw}     # the LM runs' settings, unless given
        method = "tengrad-tuned"
    step, opt = peers.make_step(method, m, kw, loss, 32)
    if kw.get("fisher", "empirical") != "empirical":      # sampled labels: opt.backward's extra pass
        def step(x, y):
            out = m(x)
            opt.zero_grad()
            lv = float(opt.backward(out.transpose(1, 2), y))    # cross_entropy's class dim 1: [N, 256, T]
            opt.step()
            return lv
    gen = torch.Generator().manual_seed(0)
    out, acc, times = [], 0.0, []
    for s in range(steps):
        st = torch.randint(0, len(train) - 130, (32, 1), generator=gen)
        w = train[st + torch.arange(129)].long()
        t0 = time.perf_counter()
        try:
            lv = step(w[:, :-1], w[:, 1:])
        except Exception as exc:       # a non-finite step (TENGraDError names the layer): the arm diverged
            print(method, kw, f"diverged at step {s}: {exc}", out, flush=True)
            return
        times.append(time.perf_counter() - t0)
        acc += lv
        if s % 15 == 14:
            nu = getattr(opt, "last_nu", None)
            out.append((s, round(acc / 15, 3)) + ((round(float(nu), 3),) if nu is not None else ()))
            acc = 0.0
    print(method, kw, f"{1e3 * statistics.median(times):.0f} ms/step", out, flush=True)


steps = int(sys.argv[2]) if len(sys.argv) > 2 else 150
for kw in eval(sys.argv[1]):
    run(kw.pop("method"), steps, **kw)
