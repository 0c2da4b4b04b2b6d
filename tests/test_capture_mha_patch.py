"""During a captured forward of a model with nn.MultiheadAttention, torch.nn.functional's ``linear`` is
the recording one (op_capture._mha_linear, swapped once per forward); afterwards - also when the
forward raises - it is torch's own again, and forwards that capture nothing never touch it. The
curvature such forwards produce is checked against the torch.func oracle in test_optim_zoo.py."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tengrad.optim import TENGraD

LINEAR = F.linear


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.seen = None

    def forward(self, x):
        self.seen = torch.nn.functional.linear       # what the model's own code sees mid-forward
        h, _ = self.mha(x, x, x, need_weights=False)
        return self.head(h).mean(1)


def make():
    torch.manual_seed(0)
    model = Attn().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, lr=0.1, damping=1.0, update_freq=2)
    return model, opt


def test_linear_is_swapped_only_inside_captured_forwards_and_always_restored():
    model, opt = make()
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()          # curvature due: captured
    assert model.seen is not LINEAR and F.linear is LINEAR
    assert "forward" not in model.mha.__dict__        # wrapped for the captured forward only
    mha_uses = [u for u in opt._capture.ops.uses if "mha" in u.name]
    assert len(mha_uses) == 2 and all(u.grad is not None for u in mha_uses)   # in_proj and out_proj
    opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()          # reuse step: nothing captured, nothing swapped
    assert model.seen is LINEAR and not opt._capture.ops.uses
    opt.step()
    with pytest.raises(AssertionError, match="embedding dimension"):
        model(torch.randn(4, 5, 7, dtype=torch.float64))   # curvature due again; the MHA raises inside
    assert F.linear is LINEAR
    assert "forward" not in model.mha.__dict__        # its recording forward is gone again too
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()          # and the next captured forward works as before
    assert model.seen is not LINEAR and F.linear is LINEAR
    opt.step()


def test_a_forward_of_the_users_own_on_the_attention_is_kept():
    """An instance-level forward the user set on the MultiheadAttention runs inside the capture's
    wrapper during captured forwards and is its forward again afterwards."""
    model, opt = make()
    calls = []
    cls_forward = type(model.mha).forward

    def own(*args, **kwargs):
        calls.append(1)
        return cls_forward(model.mha, *args, **kwargs)

    model.mha.forward = own
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    opt.zero_grad()
    F.cross_entropy(model(x), torch.randint(0, 3, (4,))).backward()
    assert calls == [1] and model.mha.__dict__["forward"] is own
    assert len([u for u in opt._capture.ops.uses if "mha" in u.name]) == 2
