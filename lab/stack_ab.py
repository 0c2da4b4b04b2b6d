"""A/B of the stacked small explicit-J blocks (curvature/stacked.py) on reuse steps: one optimizer with
the stack (the default SMALL), one without (SMALL = 0: per-block mat-vecs), SGD beside them; one process,
the three interleaved (order reversed every round), median full step (zero_grad, forward, backward, step).

    .venv/bin/python -W ignore lab/stack_ab.py resnet18 21 '{}'
    .venv/bin/python -W ignore lab/stack_ab.py resnet18 21 '{"curvature_batch": 8}'
    THREADS=1 CLOCK=cpu .venv/bin/python -W ignore lab/stack_ab.py resnet18 21   # on a shared machine
"""
import json, os, statistics, sys, time, warnings
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import torch
THREADS = int(os.environ.get("THREADS", "2"))
torch.set_num_threads(THREADS)
clock = time.thread_time if os.environ.get("CLOCK") == "cpu" else time.perf_counter
import tengrad
from tengrad.optim.curvature import stacked
from zoo_models import build

name, rounds = sys.argv[1], int(sys.argv[2])
kw = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
factory, x, y, loss, _ = build(name)
SMALL = stacked.SMALL
arms = {}
m = factory(); arms["sgd"] = (m, torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9), SMALL)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for label, small in (("stacked", SMALL), ("per-block", 0)):
        m = factory(); arms[label] = (m, tengrad.TENGraD(m, 1e-3, 1.0, momentum=0.9, update_freq=10 ** 9, **kw), small)


def step(label):
    m, o, small = arms[label]
    stacked.SMALL = small
    t = clock()
    o.zero_grad(); loss(m(x), y).backward(); o.step()
    return clock() - t


for label in arms:
    for _ in range(3):
        step(label)
T = {k: [] for k in arms}
for r in range(rounds):
    for label in (list(arms) if r % 2 else list(arms)[::-1]):
        T[label].append(step(label))
s = statistics.median(T["sgd"])
print(f"{name} {kw}: " + ", ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms ({statistics.median(v) / s:.3f}x)"
                                   for k, v in T.items()))
