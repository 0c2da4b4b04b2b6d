"""The dense float64 oracle for models called with keywords (``model(**batch)``, Hugging Face style).

Per-sample gradients come from one autograd pass per sample on a deep copy of the model (a copy is a
plain model: TENGraD's hooks in it do nothing), each sample its own batch of one: l_i = loss(model(
**batch_i)), so the mean loss is mean_i l_i when every sample has the same number of loss terms (no
padding). The step is then ``support.step_oracle.expected_steps``: -lr (F_b + a I)^-1 g_b per block with
F the empirical Fisher of the rows, built per block (``block_steps``: the dense [P_b, P_b] of each block
from its own rows, never the whole model's [P, P]). ``curvature_and_reuse`` runs two steps of ``update_freq=2`` (the
curvature step, then a reuse step: the fresh gradient with the first batch's Fisher) and returns the
largest relative error of any parameter's move against the oracle.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, Mapping

import torch

from tengrad.optim import TENGraD

from .step_oracle import dense_directions, fisher_from_grads

Loss = Callable[[torch.nn.Module, dict], torch.Tensor]


def hf_loss(model, batch: dict) -> torch.Tensor:
    """The loss a Hugging Face model computes from ``labels`` in the batch."""
    return model(**batch).loss


def sample_rows(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], loss: Loss,
                m: int) -> dict[str, torch.Tensor]:
    """{name: [m, *shape]} per-sample gradients (float64 copy, one sample at a time)."""
    twin = copy.deepcopy(model).to(torch.float64)
    names = [n for n, p in twin.named_parameters() if p.requires_grad]
    params = [p for p in twin.parameters() if p.requires_grad]
    rows = {n: [] for n in names}
    for i in range(m):
        one = {k: (v[i:i + 1].to(torch.float64) if v.is_floating_point() else v[i:i + 1])
               if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == m else v for k, v in batch.items()}
        gs = torch.autograd.grad(loss(twin, one), params, allow_unused=True)
        for n, p, g in zip(names, params, gs):
            rows[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}


def curvature_and_reuse(model: torch.nn.Module, batches: list[dict], loss: Loss = hf_loss, lr: float = 0.1,
                        damping: float = 0.5, **opt_kwargs) -> tuple[TENGraD, float]:
    """Two steps of TENGraD(model, update_freq=2, kl_clip=None, momentum=0) against the oracle; returns
    (the optimizer, the largest relative error of a parameter's move)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, lr=lr, damping=damping, momentum=0.0, update_freq=2, kl_clip=None, check=True,
                      **{"prior": None, "step_rule": "natural", **opt_kwargs})
    worst, first = 0.0, None
    for s, batch in enumerate(batches):
        m = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
        rows = sample_rows(model, batch, loss, m)
        g = {n: r.mean(0) for n, r in rows.items()}
        first = rows if s == 0 else first
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        loss(model, batch).backward()
        opt.step()
        exp = block_steps(opt, model, first, g, lr, damping)
        whole = float(torch.sqrt(sum((e.double() ** 2).sum() for e in exp.values())))
        for n, p in model.named_parameters():
            if n in exp:
                ref = max(float(exp[n].double().norm()), 1e-6 * whole)
                err = float((p.detach().double() - before[n].double() - exp[n].double()).norm()) / ref
                worst = max(worst, err)
    return opt, worst


def block_steps(opt, model, rows: Mapping[str, torch.Tensor], g: Mapping[str, torch.Tensor], lr: float,
                damping: float) -> dict[str, torch.Tensor]:
    """{param name: -lr (F_b + a I)^-1 g_b} per block of ``opt.blocks`` (F_b from ``rows`` of that block's
    parameters), -lr g / a for ``opt.fallback``; every trainable parameter exactly once."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    out = {}
    for b in opt.blocks:
        names = list(b.param_names)
        if names:
            d = dense_directions(fisher_from_grads(rows, names), names, shapes, g, [names], damping)
            out.update({n: -lr * v for n, v in d.items()})
    for n, p in opt.fallback:
        if p.requires_grad:
            out[n] = -lr * g[n] / damping
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(out) == trainable, set(out) ^ trainable
    return out
