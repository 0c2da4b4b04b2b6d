"""A small ResNet with BatchNorm, trained by TENGraD on scikit-learn's digits (8x8 images, 10 classes).

Every Conv2d, BatchNorm2d and Linear is an exact Fisher block: BatchNorm's rows come from the
batch-normalised x_hat with the batch statistics of the captured batch held fixed (the K-FAC
convention), so nothing falls back to the damped identity.

    python examples/resnet_bn.py            # 30 steps, prints the loss and the test accuracy
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import tengrad


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the (projected) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResNet(nn.Module):
    def __init__(self, width: int = 12, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):                                   # x [m, 1, 8, 8]
        h = self.layer2(self.layer1(self.stem(x)))
        return self.head(h.mean((2, 3)))


def load_digits(seed: int = 0):
    """(x_train, y_train, x_test, y_test): standardised float32 images [n, 1, 8, 8], int64 labels."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def train(steps: int = 30, batch: int = 64, lr: float = 0.3, damping: float = 1.0, seed: int = 0,
          width: int = 12):
    """Train for ``steps`` TENGraD steps; returns (model, optimizer, per-step losses, test accuracy)."""
    x_train, y_train, x_test, y_test = load_digits(seed)
    torch.manual_seed(seed)
    model = ResNet(width)
    # the paper's natural-gradient step (D = I) at its own lr: the defaults (prior="soap", step_rule="adam")
    # take SOAP's lr 3e-3, made for thousands of steps rather than this example's few dozen
    opt = tengrad.TENGraD(model, lr=lr, damping=damping, momentum=0.9, prior=None)
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y_train), (batch,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # large early steps leave BatchNorm's running averages stale: re-estimate them (as SWA does)
    # from training batches before evaluating
    torch.optim.swa_utils.update_bn(x_train.split(256), model)
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    return model, opt, losses, acc


if __name__ == "__main__":
    model, opt, losses, acc = train()
    print(opt.explain())
    for s in range(0, len(losses), 5):
        print(f"step {s:3d}  loss {losses[s]:.3f}")
    print(f"final loss {losses[-1]:.3f}, test accuracy {acc:.3f}")
