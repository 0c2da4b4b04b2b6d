"""Capture exists only while curvature is due: reuse steps run the model on torch's fast call path
(forward_wrap.py, hookset.py), and hooks switched off come back in their old place among the user's
hooks."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from tengrad.optim import TENGraD
from tengrad.optim.capture.hooks import HookSet


def test_hooks_return_to_their_place_among_user_hooks():
    lin = nn.Linear(2, 2)
    calls = []

    def hook(tag):
        return lambda m, a, o: calls.append(tag)

    lin.register_forward_hook(hook("user-before"))
    hs = HookSet()
    hs.add(lin.register_forward_hook(hook("ours"), always_call=True))
    lin.register_forward_hook(hook("user-after"))
    hs.off()
    assert len(lin._forward_hooks) == 2 and not lin._forward_hooks_always_called
    lin.register_forward_hook(hook("added-while-off"))
    lin.register_forward_hook(hook("prepended-while-off"), prepend=True)
    lin(torch.zeros(1, 2))
    assert calls == ["prepended-while-off", "user-before", "user-after", "added-while-off"]
    calls.clear()
    hs.on()
    assert len(lin._forward_hooks_always_called) == 1
    lin(torch.zeros(1, 2))
    assert calls == ["prepended-while-off", "user-before", "ours", "user-after", "added-while-off"]
    hs.remove()
    calls.clear()
    lin(torch.zeros(1, 2))
    assert "ours" not in calls and len(calls) == 4


def _hooked(model):
    return [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def _wrapped(model):
    return [n for n, m in model.named_modules() if "forward" in m.__dict__]


def test_capture_runs_in_forward_wrappers_only_on_curvature_steps():
    """Curvature steps: the blocks' modules run a capture wrapper as their instance forward for that
    forward and its backward (forward_wrap.py), none is left after that, and no module but the root has
    a hook; reuse steps: only the root's gate (one pre-hook), nothing wrapped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, 0.1, 1.0, update_freq=3)
    inside = []
    model[1].register_forward_hook(lambda m, a, o: inside.append(_wrapped(model)))
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    seen = []
    for step in range(7):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        seen.append((_hooked(model), _wrapped(model), len(model._forward_hooks), len(model._forward_pre_hooks)))
        opt.step()
    for step, ((hooked, wrapped, post, pre), during) in enumerate(zip(seen, inside)):
        assert wrapped == [] and hooked[0] == "" and set(hooked) <= {"", "1"}, (step, hooked, wrapped)
        if step % 3 == 0:     # curvature steps: the blocks' capture wrappers during the forward ("1", the
            #                   parameter-free Tanh, suspends the op-level mode), the root's exit hook
            assert during == ["0", "1", "2"] and post >= 1, (step, during, post)
        else:                 # reuse steps: only the root's gate (one pre-hook)
            assert during == [] and post == 0 and pre == 1, (step, during, post, pre)
    assert opt.blocks[0].curv is not None and opt.blocks[0].curv.m == 5


class _NoCache(dict):
    def __setitem__(self, key, value):      # the op fast path never finds an entry
        pass


def test_op_fast_path_gives_the_general_paths_steps():
    """Op calls answered from the fast cache (op_capture.OpCapture.call) record the same uses as the
    general path: equal parameters after several curvature steps of a tied-head model."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 5)
            self.lin = nn.Linear(5, 5)

        def forward(self, ids):
            h = torch.tanh(self.lin(self.emb(ids)))
            return F.linear(F.layer_norm(h, (5,)), self.emb.weight)     # ops at the root

    models, opts = [], []
    for cached in (True, False):
        torch.manual_seed(0)
        model = Tied().double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = TENGraD(model, 0.1, 0.5, update_freq=1)
        if not cached:
            opt._capture.ops._fast = _NoCache()
        models.append(model)
        opts.append(opt)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, 7, (6,), generator=gen)
        y = torch.randint(0, 7, (6,), generator=gen)
        for model, opt in zip(models, opts):
            opt.zero_grad()
            F.cross_entropy(model(ids), y).backward()
            opt.step()
    assert opts[0]._capture.ops._fast and not opts[1]._capture.ops._fast
    assert opts[0].blocks[0].uses == opts[1].blocks[0].uses and len(opts[0].blocks[0].uses) == 2
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)
