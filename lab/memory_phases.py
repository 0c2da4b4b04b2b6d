"""Where a TENGraD step's memory goes: peak RSS per phase of the first 3 steps (one curvature step at
k = 10, two reuse steps) of a zoo model, sampled by a thread every 0.2 ms, minus the RSS after building
the model, batch and optimizer (step_zoo's baseline). Also SGD's 3 steps in the same form.

    PYTHONPATH=. .venv/bin/python lab/memory_phases.py vit_tiny [--method sgd] [--curvature-batch 8]
"""
import argparse
import os
import sys
import threading
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import torch  # noqa: E402

from zoo_models import build  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
phase = ["setup"]
peaks: dict[str, int] = {}
stop = False


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def sampler():
    while not stop:
        r = rss()
        p = phase[0]
        if r > peaks.get(p, 0):
            peaks[p] = r
        time.sleep(0.0002)


def wrap(obj, name, label):
    import inspect
    static = isinstance(inspect.getattr_static(obj, name), staticmethod)
    real = getattr(obj, name)

    def f(*a, **k):
        old = phase[0]
        phase[0] = f"{old.split(':')[0]}:{label}"
        try:
            return real(*a, **k)
        finally:
            phase[0] = old
    setattr(obj, name, staticmethod(f) if static else f)


def main():
    global stop
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--method", default="tengrad")
    p.add_argument("--curvature-batch", type=int, default=None)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(2)
    factory, x, y, loss, _ = build(a.model)
    model = factory()
    if a.method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    else:
        import tengrad
        from tengrad.optim import update
        from tengrad.optim.curvature import batched, build as build_mod, roofline
        from tengrad.optim.estimator import local
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = tengrad.TENGraD(model, 1e-3, 1.0, momentum=0.9, update_freq=a.k,
                                  **({} if a.curvature_batch is None else {"curvature_batch": a.curvature_batch}))
        wrap(roofline, "measured", "roofline")
        wrap(local.LocalEstimator, "loss_scale", "loss_scale")
        wrap(local.LocalEstimator, "_fresh", "fresh rows+K")
        wrap(local.LocalEstimator, "_curvatures", "grams+factor")
        wrap(batched.Solver, "solve", "solve")
        wrap(update, "apply", "apply")
        wrap(update, "check_finite", "check_finite")
        wrap(update, "kl_scale", "kl_scale")
        local.build.block_rows = build_mod.block_rows  # noqa
        wrap(local.build, "block_rows", "block_rows")
    base = rss()
    params = sum(q.numel() * q.element_size() for q in model.parameters())
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    for s in range(a.steps):
        phase[0] = f"s{s}:zero_grad"
        opt.zero_grad()
        phase[0] = f"s{s}:forward"
        out = model(x)
        l = loss(out, y)
        phase[0] = f"s{s}:backward"
        l.backward()
        del out, l
        phase[0] = f"s{s}:step"
        opt.step()
        if os.environ.get("TRIM"):
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        phase[0] = f"s{s}:after"
        time.sleep(0.01)
    stop = True
    th.join()
    print(f"{a.model} {a.method} c={a.curvature_batch}: params {params / 2**20:.1f} MB; "
          f"VmHWM - base {(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024 - base) / 2**20:.1f} MB")
    for k, v in peaks.items():
        print(f"  {k:28s} {(v - base) / 2**20:8.1f} MB")


if __name__ == "__main__":
    main()
