"""The LM task's first steps with TENGraD options given as a Python list of dicts (argv[1]): training loss
(mean of 15 steps) and the KL clip's nu, same initial weights and batches (docs/experiments/lm-token-rows.md).

    .venv/bin/python lab/lm_token_rows_probe.py '[dict(prior="adam"), dict(prior="adam", token_rows=128, lr=3.0)]'
"""
import sys

import torch
sys.path.insert(0, "benchmarks")
from tasks.stdlib_lm import ByteLM, loss
from tasks import stdlib_corpus
import tengrad
train, val, meta = stdlib_corpus.load(max_bytes=3_000_000)
def run(steps=150, **kw):
    torch.manual_seed(0)
    m = ByteLM()
    opt = tengrad.TENGraD(m, noise_scale=False, curvature_batch=None, **kw)
    gen = torch.Generator().manual_seed(0)
    out, acc = [], 0.0
    for s in range(steps):
        st = torch.randint(0, len(train) - 130, (32, 1), generator=gen)
        w = train[st + torch.arange(129)].long()
        opt.zero_grad(); l = loss(m(w[:, :-1]), w[:, 1:]); l.backward(); opt.step()
        acc += l.item()
        if s % 15 == 14: out.append((s, round(acc / 15, 3), round(float(opt.last_nu), 3))); acc = 0.0
    print(kw, out, flush=True)
for kw in eval(sys.argv[1]):
    run(**kw)
