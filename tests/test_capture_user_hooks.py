"""A user's tensor hook on a captured layer output lives beside TENGraD's (capture.keep_grad binds its
hook dict to the output's node without a RemovableHandle): the user's hook gets the output gradient
autograd computes (oracle: torch.autograd.grad, float64), its handle removes it, and TENGraD's step
still equals the dense (F + a I)^-1 g oracle with per-sample gradients from torch.func."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from support.step_oracle import expected_steps, oracle_fisher
from tengrad.optim import TENGraD


class HookedMLP(nn.Module):
    """Registers ``self.user_hook`` on the first Linear's output in every forward, as a user's
    gradient logging does; the output then feeds an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)
        self.user_hook = None
        self.handles = []
        self.h = None

    def forward(self, x):
        h = self.a(x)
        if self.user_hook is not None:
            self.handles.append(h.register_hook(self.user_hook))
        self.h = h
        return self.b(F.relu(h, inplace=True))


def test_user_hook_on_a_captured_output_and_the_step_match_their_oracles():
    torch.manual_seed(0)
    model = HookedMLP().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    opt = TENGraD(model, lr=0.3, damping=0.5, momentum=0.0, kl_clip=None, check=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    F_dense, names = oracle_fisher(model, x, y, "empirical", "cross_entropy")
    seen = []
    model.user_hook = seen.append

    # the oracle for dL/dh (h before the in-place ReLU), from detached copies of the weights: no
    # call of the model's modules, which the armed capture would record as another use
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    h_ref = F.linear(x, w["a.weight"], w["a.bias"]).requires_grad_()
    want = torch.autograd.grad(F.cross_entropy(F.linear(F.relu(h_ref), w["b.weight"], w["b.bias"]), y), h_ref)[0]
    opt.zero_grad()
    out = model(x)
    h = model.h
    F.cross_entropy(out, y).backward()
    assert len(seen) == 1 and h is not None
    torch.testing.assert_close(seen[0], want, rtol=1e-12, atol=1e-15)
    g = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    exp = expected_steps(opt, model, F_dense, names, g, 0.3, 0.5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - before[n], exp[n], rtol=1e-8, atol=1e-12)

    # the user's handle removes only the user's hook: a second curvature step still captures
    model.user_hook = None
    model.handles[0].remove()
    opt.update_freq = 1
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert len(seen) == 1
    assert all(b.curv is not None for b in opt.blocks)
