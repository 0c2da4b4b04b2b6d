"""TENGraD against a dense oracle: one step equals -lr (F_b + a I)^-1 g_b per block, in float64.

The oracle never uses the optimizer's machinery: per-sample gradients of the per-sample losses come
from torch.func (vmap of grad), the exact Fisher from per-sample output Jacobians (vmap of jacrev) and
the loss Hessian written out directly (no square root), F = (1/m) sum_i J_i^T H_i J_i.
Steps 2..k of update_freq=k use the fresh gradient with the Fisher of the stored (first) batch.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from tengrad.optim import TENGraD

LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


# ---------------------------------------------------------------- models (cases are data)
class ConvSeqNet(nn.Module):
    """Conv2d(groups=2) -> Conv1d -> LayerNorm -> Linear on a sequence -> PReLU (no plan) -> mean."""

    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.conv1 = nn.Conv1d(6, 4, 3, stride=2)
        self.norm = nn.LayerNorm(4)
        self.lin = nn.Linear(4, 3)
        self.act = nn.PReLU()

    def forward(self, x):                                  # x [m, 4, 5, 5]
        h = torch.tanh(self.conv2(x)).flatten(2)            # [m, 6, 25]
        h = torch.tanh(self.conv1(h)).transpose(1, 2)       # [m, 12, 4]
        h = self.lin(self.norm(h))                          # [m, 12, 3]
        return self.act(h).mean(1)                          # [m, 3]


class TokenNet(nn.Module):
    """Embedding -> LayerNorm -> Linear on a sequence -> tanh -> mean -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)
        self.lin1 = nn.Linear(6, 5)
        self.lin2 = nn.Linear(5, 3)

    def forward(self, x):                                   # x [m, 7] token ids
        return self.lin2(torch.tanh(self.lin1(self.norm(self.emb(x)))).mean(1))


def make_batch(kind: str, m: int, loss: str, gen: torch.Generator, dtype=torch.float64):
    if kind == "conv":
        x = torch.randn(m, 4, 5, 5, generator=gen, dtype=dtype)
    elif kind == "mlp":
        x = torch.randn(m, 5, generator=gen, dtype=dtype)
    else:
        x = torch.randint(0, 10, (m, 7), generator=gen)
    if loss == "cross_entropy":
        y = torch.randint(0, 3, (m,), generator=gen)
    else:
        y = torch.randn(m, 3, generator=gen, dtype=dtype)
    return x, y


def make_model(kind: str, dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":   # an in-place activation right after a layer output
        model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))
    else:
        model = ConvSeqNet() if kind == "conv" else TokenNet()
    return model.to(dtype)


# ---------------------------------------------------------------- the oracle
def _params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def per_sample_grads(model, x, y, loss: str) -> dict[str, torch.Tensor]:
    """{name: [m, *shape]}: gradients of l_i = loss(out_i, y_i) (so that L = mean_i l_i)."""
    fn = LOSSES[loss]

    def li(pd, xi, yi):
        return fn(functional_call(model, pd, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(li), in_dims=(None, 0, 0))(_params(model), x, y)


def flat(tensors: dict, names: list[str], batched: bool) -> torch.Tensor:
    if batched:
        return torch.cat([tensors[n].reshape(tensors[n].shape[0], -1) for n in names], dim=1)
    return torch.cat([tensors[n].reshape(-1) for n in names])


def oracle_fisher(model, x, y, fisher: str, loss: str, labels=None) -> tuple[torch.Tensor, list[str]]:
    """Dense F [P, P] over all trainable parameters (in named_parameters order) and the names."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    m = x.shape[0]
    if fisher in ("empirical", "mc"):
        rows = flat(per_sample_grads(model, x, y if fisher == "empirical" else labels, loss), names, True)
        return rows.T @ rows / m, names

    def out_i(pd, xi):
        return functional_call(model, pd, (xi.unsqueeze(0),))[0]          # [C]

    # a loop over samples, not vmap: PReLU's batching rule breaks vmap(jacrev)
    jacs = [jacrev(out_i)(_params(model), x[i]) for i in range(m)]             # {n: [C, *shape]}
    J = torch.stack([torch.cat([j[n].reshape(j[n].shape[0], -1) for n in names], dim=1)
                     for j in jacs])                                           # [m, C, P]
    out = model(x).detach()
    c = out.shape[1]
    if loss == "mse":
        H = (2.0 / c) * torch.eye(c, dtype=out.dtype).expand(m, c, c)
    else:
        p = torch.softmax(out, dim=1)
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("icp,icd,idq->pq", J, H, J) / m, names


def expected_steps(opt, model, F_dense, names, g: dict, lr: float, damping: float) -> dict[str, torch.Tensor]:
    """{param name: expected change} = -lr (F_b + a I)^-1 g_b per block, -lr g / a for fallback."""
    index = {n: i for i, n in enumerate(names)}
    offsets, start = {}, 0
    shapes = dict(model.named_parameters())
    for n in names:
        offsets[n] = (start, start + shapes[n].numel())
        start += shapes[n].numel()
    out = {}
    for b in opt.blocks:
        sl = torch.cat([torch.arange(*offsets[n]) for n in b.param_names])
        Fb = F_dense[sl][:, sl]
        gb = flat(g, b.param_names, False)
        d = torch.linalg.solve(Fb + damping * torch.eye(len(sl), dtype=Fb.dtype), gb)
        for n in b.param_names:
            lo = offsets[n][0] - offsets[b.param_names[0]][0]
            size = shapes[n].numel()
            out[n] = -lr * d[lo:lo + size].reshape(shapes[n].shape)
    for n, p in opt.fallback:
        out[n] = -lr * g[n] / damping
    assert set(out) == set(index)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def perturb_parameters(model: nn.Module, gen: torch.Generator, scale: float = 0.3) -> None:
    """Move every parameter by scale * N(0, 1) (seeded): no layer keeps torch's default init (norm
    weights of exactly 1 and zero biases would hide index mistakes)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def run_against_oracle(kind, fisher, loss, k, sizes, lr=0.3, damping=0.5, tol=1e-8, model=None,
                       **opt_kwargs):
    """Run len(sizes) steps and check each parameter change against the oracle; returns the optimizer."""
    model = make_model(kind) if model is None else model
    opt_kwargs.setdefault("kl_clip", None)      # the exact step: no KL clipping
    opt_kwargs.setdefault("check", True)     # J^T 1/m == param.grad on every curvature step
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, lr, damping, momentum=0.0, update_freq=k, fisher=fisher,
                      generator=torch.Generator().manual_seed(2), **opt_kwargs)
    F_stored = None
    errs = []
    for s, m in enumerate(sizes):
        x, y = make_batch(kind, m, loss, gen, dtype=next(model.parameters()).dtype)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        g = {n: t.mean(0) for n, t in per_sample_grads(model, x, y, loss).items()}
        out = model(x)
        opt.zero_grad()
        if fisher == "empirical" and s % 2 == 0:
            LOSSES[loss](out, y).backward()          # the plain path
        else:
            opt.backward(out, y, loss=loss)
        if s % k == 0:
            F_stored, names = oracle_fisher(model, x, y, fisher, loss, labels=opt.last_labels)
        opt.step()
        exp = expected_steps(opt, model, F_stored, names, g, lr, damping)
        for n, p in model.named_parameters():
            if n not in exp:
                assert torch.equal(p, before[n]), f"frozen {n} moved"
                continue
            errs.append((s, n, rel_err(p.detach() - before[n], exp[n])))
    bad = [e for e in errs if e[2] > tol]
    assert not bad, bad
    return opt


CASES = [(kind, fisher, loss) for kind in ("conv", "tokens") for fisher in ("empirical", "mc", "exact")
         for loss in ("cross_entropy", "mse")]


@pytest.mark.parametrize("kind,fisher,loss", CASES, ids=["-".join(c) for c in CASES])
def test_one_step_matches_dense_oracle(kind, fisher, loss):
    run_against_oracle(kind, fisher, loss, k=1, sizes=[5, 3])


# every case on the path the cost model picks, and the cross_entropy cases again on the reuse path
FREQ_CASES = [c + ("auto",) for c in CASES] + [c + ("reuse",) for c in CASES if c[2] == "cross_entropy"]


@pytest.mark.parametrize("kind,fisher,loss,path", FREQ_CASES, ids=["-".join(c) for c in FREQ_CASES])
def test_update_freq_reuses_stored_batch(kind, fisher, loss, path):
    # steps 2..3 use the Fisher of step 1's batch; batch sizes change, and m = 1 is a curvature step.
    # path "reuse" forbids explicit Jacobians (memory cap 0), so x/gy and plan.jvp/vjp are exercised.
    extra = {"max_jacobian_numel": 0} if path == "reuse" else {}
    opt = run_against_oracle(kind, fisher, loss, k=3, sizes=[4, 6, 1, 1, 3], **extra)
    assert all(b.curv is not None for b in opt.blocks)
    if path == "reuse":
        assert all(b.choice.path == "reuse" for b in opt.blocks)


def test_mc_labels_are_reproducible():
    def labels(seed):
        model = make_model("tokens")
        opt = TENGraD(model, 0.1, 0.5, fisher="mc", generator=torch.Generator().manual_seed(seed))
        x, y = make_batch("tokens", 8, "cross_entropy", torch.Generator().manual_seed(0))
        opt.backward(model(x), y, loss="cross_entropy")
        return opt.last_labels

    assert torch.equal(labels(3), labels(3))
    assert not torch.equal(labels(3), labels(4))
