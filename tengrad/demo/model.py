"""The paper's 3C1F network for Fashion-MNIST (Appendix A.4.1).

Three 3x3 convolutions (stride 1, padding 1: 28x28 stays 28x28) with ReLU, then a 3x3 max-pool
(28x28 -> 9x9, so the first fully connected layer takes 9*9*width inputs as in the paper), a fully
connected layer to ``hidden`` units with ReLU and a final fully connected layer to 10 logits.
The paper uses width=128, hidden=500; the demo defaults are CPU-sized.
"""
from __future__ import annotations

import torch.nn as nn


def three_c_one_f(width: int = 128, hidden: int = 500, in_channels: int = 1, num_classes: int = 10,
                  image_size: int = 28) -> nn.Sequential:
    pooled = image_size // 3
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=1, padding=1), nn.ReLU(),
        nn.MaxPool2d(3),
        nn.Flatten(),
        nn.Linear(pooled * pooled * width, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
