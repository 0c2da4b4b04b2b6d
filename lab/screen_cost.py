"""What the per-step penalty screen costs (issue 20, item 5): curvature steps (update_freq 1) of the
Transformer and ResNet examples with the screen on (the default) and off (``LocalEstimator.screens``
answering False), interleaved round robin on the same model, batch and seed; process CPU time, median.

    .venv/bin/python lab/screen_cost.py --rounds 25
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.step_models import ModelBench
from tengrad.optim import TENGraD
from tengrad.optim.estimator.local import LocalEstimator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    real = LocalEstimator.screens
    for name in ("transformer", "resnet"):
        bench = ModelBench(name, args.batch, damping=0.1)
        arms = {}
        for arm in ("screen on", "screen off"):
            m = bench.model()
            opt = TENGraD(m, 1e-3, 0.1, momentum=0.9, update_freq=1)
            arms[arm] = bench.torch_step(m, opt)
        times = {arm: [] for arm in arms}
        for r in range(args.rounds + 2):
            for arm, step in arms.items():
                LocalEstimator.screens = staticmethod(real) if arm == "screen on" else staticmethod(lambda *a: False)
                t = time.process_time()
                step()
                if r >= 2:
                    times[arm].append(time.process_time() - t)
        LocalEstimator.screens = staticmethod(real)
        on, off = (statistics.median(times[a]) * 1e3 for a in ("screen on", "screen off"))
        print(f"{name}, batch {args.batch}: curvature step {off:.2f} ms without the screen, {on:.2f} ms with it "
              f"({on / off:.3f}x)")


if __name__ == "__main__":
    main()
