"""Single-process plain, staggered and shared-parameter steps build every block's curvature through
curvature/build.py's ``block_rows`` (spied on), and the steps still match the dense float64 oracle
(the oracle tests in the other files; here: the path is the one path, and every due block takes it).
The distributed estimators call the same function (tests/test_package_layers.py checks the source;
tests/test_distributed.py their steps against the oracle)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tengrad.optim import TENGraD
from tengrad.optim.curvature import build


class Tied(nn.Module):
    """An embedding whose weight is also the output head (a block with two uses)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids)))
        return F.linear(h, self.emb.weight).mean(1)


def _spy(monkeypatch):
    seen: list[tuple[str, int]] = []
    real = build.block_rows

    def spy(b, uses, *args, **kwargs):
        seen.append((b.name, len(uses)))
        return real(b, uses, *args, **kwargs)

    monkeypatch.setattr(build, "block_rows", spy)
    return seen


@pytest.mark.parametrize("case", ["plain", "stagger", "shared"])
def test_every_due_block_goes_through_block_rows(monkeypatch, case):
    torch.manual_seed(0)
    seen = _spy(monkeypatch)
    if case == "shared":
        model = Tied()
        data = lambda: (torch.randint(0, 11, (8, 5)), torch.randint(0, 11, (8,)))   # noqa: E731
    else:
        model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3))
        data = lambda: (torch.randn(8, 4), torch.randint(0, 3, (8,)))   # noqa: E731
    k = 3
    opt = TENGraD(model, lr=0.1, damping=1.0, update_freq=k, stagger=case == "stagger", check=True)
    due_per_step = []
    for step in range(2 * k):
        x, y = data()
        due = [b.name for b in opt.blocks if opt.estimator.due(b, step, k)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        start = len(seen)
        opt.step()
        due_per_step.append((sorted(due), sorted(n for n, _ in seen[start:])))
    for step, (due, built) in enumerate(due_per_step):
        assert due == built, (step, due, built)
    if case == "stagger":       # one block per step after the first: the steps differ
        assert len({tuple(d) for d, _ in due_per_step[1:]}) > 1
    if case == "shared":        # the tied weight's block was built from both of its uses
        assert any(n == "emb" and uses == 2 for n, uses in seen), seen
