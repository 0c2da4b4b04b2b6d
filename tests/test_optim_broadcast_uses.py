"""Uses with no sample dimension at all: nanoGPT's position embedding ``wpe(torch.arange(T))`` (ids [T],
output [T, d] broadcast over the batch by ``tok + pos``), as a module call and as an op-level
``F.embedding`` of a free parameter. The capture expands the call over the batch in the captured
forward (capture/sample.py ``prepend_batch``), so each sample gets its own output gradient: one
curvature step and one reuse step equal the dense float64 per-block oracle (support/step_oracle.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.numerics import rel_err
from support.step_oracle import expected_steps, fisher_from_grads, per_sample_grads
from tengrad.optim import TENGraD


class NanoGPT(nn.Module):
    """Token and position embeddings (positions as ``arange(T)``: no batch dim), tanh, a head, mean over T."""

    def __init__(self, op_level: bool):
        super().__init__()
        self.op_level = op_level
        self.wte = nn.Embedding(11, 6)
        if op_level:
            self.wpe_weight = nn.Parameter(torch.randn(8, 6) * 0.5)
        else:
            self.wpe = nn.Embedding(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        pe = F.embedding(pos, self.wpe_weight) if self.op_level else self.wpe(pos)
        return self.head(torch.tanh(self.wte(idx) + pe)).mean(1)


@pytest.mark.parametrize("op_level", [False, True], ids=["nn.Embedding", "F.embedding"])
def test_a_position_embedding_of_arange_t_is_exact_without_a_declaration(op_level):
    torch.manual_seed(0)
    model = NanoGPT(op_level).double()
    opt = TENGraD(model, lr=0.2, damping=0.5, momentum=0.0, kl_clip=None, update_freq=2, prior=None)
    names = [n for n, _ in model.named_parameters()]
    kept = None
    for s in range(3):                      # curvature, reuse, curvature
        gen = torch.Generator().manual_seed(s)
        idx, y = torch.randint(0, 11, (4, 5), generator=gen), torch.randint(0, 3, (4,), generator=gen)
        rows = per_sample_grads(model, idx, y, "cross_entropy")
        if s % 2 == 0:
            kept = fisher_from_grads(rows, names)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        F.cross_entropy(model(idx), y).backward()
        opt.step()
        # the per-block partition after the step: a free parameter becomes a block at its first step
        exact = expected_steps(opt, model, kept, names, {n: t.mean(0) for n, t in rows.items()}, 0.2, 0.5)
        for n, p in model.named_parameters():
            assert rel_err(p.detach() - before[n], exact[n]) <= 1e-8, (s, n)
    assert not [n for n, p in opt.fallback if p.requires_grad]
    pos = next(b for b in opt.blocks if "wpe" in b.name)
    assert pos.curv.m == 4                   # per-sample rows of the batch, not the T = 5 positions
