"""Working memory only (step_zoo.memory: VmHWM after 3 steps minus the RSS after building model and batch),
per model and arm, each arm in a fresh spawned process; no timing.

    PYTHONPATH=. .venv/bin/python lab/zoo_memory.py resnet18 vit_tiny gpt mlp4096 3c1f [--curvature-batch 8]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import torch  # noqa: E402

from step_zoo import memory  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--curvature-batch", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=["sgd", "tengrad"])
    a = p.parse_args()
    gpt = dict(gpt_d=256, gpt_layers=4, gpt_vocab=4096)
    for name in a.models:
        sgd = None
        for meth in a.methods:
            peak, held = memory(name, meth, a.curvature_batch if meth == "tengrad" else None, gpt,
                                torch.get_num_threads())
            sgd = sgd or peak
            print(f"{name:10s} {meth:8s} working {peak / 2**20:7.1f} MB  x SGD {peak / sgd:5.2f}  "
                  f"extra/SGD {(peak - sgd) / sgd:5.2f}  optimizer {held / 2**20:6.1f} MB", flush=True)


if __name__ == "__main__":
    main()
