"""The dense float64 oracle of a TENGraD step: -lr (F_b + a I)^-1 g_b per block, -lr g / a for fallback.

It never uses the optimizer's machinery. Per-sample gradients of the per-sample losses come from
torch.func (vmap over grad of functional_call); the empirical Fisher is their second moment R^T R / m,
the "mc" Fisher the same for sampled labels, and the exact Fisher is built from per-sample output
Jacobians (jacrev) and the loss Hessian written out directly (no square root),
F = (1/m) sum_i J_i^T H_i J_i. ``dense_directions`` is the one dense solve every optimizer test uses;
``expected_steps`` applies it to an optimizer's blocks. ``run_against_oracle`` runs steps of TENGraD
and checks each parameter change against the oracle, computed on a float64 copy of the model (for a
float32 model too). Steps 2..k of update_freq=k use the fresh gradient with the Fisher of the stored
(first) batch.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from tengrad.optim import TENGraD
from tengrad.optim.curvature import eigenbasis

from .numerics import rel_err
from .optim_cases import LOSSES, make_batch, make_model

__all__ = ["per_sample_grads", "flat", "fisher_from_grads", "oracle_fisher", "dense_directions",
           "expected_steps", "float64_twin", "model_at", "run_against_oracle", "step_against_oracle", "two_steps"]

Loss = Union[str, Callable]


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def _loss_fn(loss: Loss) -> Callable:
    return LOSSES[loss] if isinstance(loss, str) else loss


def per_sample_grads(model: nn.Module, x, y: torch.Tensor, loss: Loss, params: Mapping | None = None,
                     batch_dims: int | Sequence[int] = 0) -> dict[str, torch.Tensor]:
    """{name: [m, *shape]} for every parameter of ``model`` (named_parameters order): the gradients of
    l_i = loss(model(x_i), y_i), so that the mean loss is mean_i l_i; torch.func, vmap over grad.

    ``x``: the forward's input or a tuple of inputs; ``batch_dims``: the sample dimension of each input
    (one int: all of them), where each sample keeps a dimension of size 1; ``y`` has samples along dim 0.
    ``loss``: a key of LOSSES or a callable (out, y_i[None]) -> scalar. ``params``: the parameter values
    to differentiate at (default: the model's own).
    """
    fn = _loss_fn(loss)
    inputs = x if isinstance(x, tuple) else (x,)
    dims = (batch_dims,) * len(inputs) if isinstance(batch_dims, int) else tuple(batch_dims)

    def li(pd, xs, yi):
        xs = tuple(t.unsqueeze(d) for t, d in zip(xs, dims))
        return fn(functional_call(model, pd, xs), yi.unsqueeze(0))

    prm = _params(model) if params is None else dict(params)
    with warnings.catch_warnings():       # vmap over CPU attention falls back to a loop: slower, same values
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        return vmap(grad(li), in_dims=(None, dims, 0))(prm, inputs, y)


def flat(tensors: Mapping[str, torch.Tensor], names: Sequence[str], batched: bool) -> torch.Tensor:
    """The tensors of ``names`` concatenated, flattened: [P] or, ``batched``, [m, P]."""
    if batched:
        return torch.cat([tensors[n].reshape(tensors[n].shape[0], -1) for n in names], dim=1)
    return torch.cat([tensors[n].reshape(-1) for n in names])


def fisher_from_grads(rows: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """R^T R / m [P, P] from per-sample gradients {name: [m, *shape]} (R: their rows over ``names``)."""
    r = flat(rows, names, True)
    return r.T @ r / r.shape[0]


def oracle_fisher(model, x, y, fisher: str, loss: Loss, labels=None, params: Mapping | None = None,
                  batch_dims: int | Sequence[int] = 0) -> tuple[torch.Tensor, list[str]]:
    """Dense F [P, P] over all trainable parameters (in named_parameters order) and their names.

    "empirical": per-sample gradients for the targets ``y``; "mc": for the sampled ``labels``; "exact":
    (1/m) sum_i J_i^T H_i J_i (only for a single input, batch_dims 0, and the losses of LOSSES)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    m = y.shape[0]
    if fisher in ("empirical", "mc"):
        rows = per_sample_grads(model, x, y if fisher == "empirical" else labels, loss, params, batch_dims)
        return fisher_from_grads(rows, names), names
    if params is not None or batch_dims != 0 or not isinstance(loss, str):
        raise ValueError("the exact Fisher oracle takes the model's own parameters, one input and a loss of LOSSES")

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


def dense_directions(F: torch.Tensor, names: Sequence[str], shapes: Mapping[str, torch.Size],
                     g: Mapping[str, torch.Tensor], blocks: Sequence[Sequence[str]],
                     damping: float | Mapping[str, float], fallback: Sequence[str] = (),
                     prior: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """THE dense solve of the optimizer tests, in float64.

    For each block (a list of parameter names) d_b = (F_b + a_b D_b)^-1 g_b: F_b the rows and columns of
    ``F`` [P, P] that belong to the block's parameters (F's columns follow ``names``, each parameter
    flattened, sizes from ``shapes``), g_b the block's entries of ``g`` ({name: gradient}) concatenated in
    the block's order. For each name in ``fallback``: d = g / a. ``damping``: one number a, or {parameter
    name: a} (a block takes its first parameter's). ``prior``: {parameter name: D_p}, its diagonal (shaped
    like the parameter) or a [size, size] matrix; D_b is their block diagonal, I for a name not given (and
    with no prior). Returns {name: d} shaped like the parameter.
    ``F`` and ``g`` must be float64 (the oracle is never computed in a lower precision)."""
    if F.dtype != torch.float64 or any(g[n].dtype != torch.float64 for b in blocks for n in b):
        raise ValueError(f"the dense oracle solves in float64; got F {F.dtype}")
    a_of = (lambda n: damping[n]) if isinstance(damping, Mapping) else (lambda n: damping)
    offsets, start = {}, 0
    for n in names:
        size = torch.Size(shapes[n]).numel()
        offsets[n] = (start, start + size)
        start += size
    if F.shape != (start, start):
        raise ValueError(f"F is {tuple(F.shape)}, the parameters hold {start}")
    out = {}
    for b in blocks:
        cols = torch.cat([torch.arange(*offsets[n]) for n in b])
        Fb = F[cols][:, cols]
        gb = torch.cat([g[n].reshape(-1) for n in b])
        Db = torch.block_diag(*[_dense_prior(prior, n, offsets[n][1] - offsets[n][0]) for n in b])
        d = torch.linalg.solve(Fb + a_of(b[0]) * Db, gb)
        lo = 0
        for n in b:
            size = offsets[n][1] - offsets[n][0]
            out[n] = d[lo:lo + size].reshape(shapes[n])
            lo += size
    for n in fallback:
        out[n] = g[n].to(torch.float64) / a_of(n)
    return out


def _dense_prior(prior: Mapping[str, torch.Tensor] | None, name: str, size: int) -> torch.Tensor:
    d = None if prior is None else prior.get(name)
    if d is None:
        return torch.eye(size, dtype=torch.float64)
    return d if d.dim() == 2 and d.shape == (size, size) else torch.diag(d.reshape(-1))


def expected_steps(opt, model, F_dense, names, g: Mapping[str, torch.Tensor], lr: float,
                   damping: float) -> dict[str, torch.Tensor]:
    """{param name: expected change} = -lr (F_b + a I)^-1 g_b for each of ``opt.blocks`` (their
    ``param_names``), -lr g / a for each of ``opt.fallback``; every trainable parameter exactly once."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    d = dense_directions(F_dense, names, shapes, g, [b.param_names for b in opt.blocks if b.param_names],
                         damping, [n for n, p in opt.fallback if p.requires_grad])
    assert set(d) == set(names), set(d) ^ set(names)
    return {n: -lr * v for n, v in d.items()}


def model_at(model: nn.Module, theta: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` at the parameters ``theta`` ({name: value}, e.g. before a step): the Fisher of a
    step's rows is taken there."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.copy_(theta[n])
    return twin


def float64_twin(model: nn.Module) -> nn.Module:
    """The model itself when every parameter is float64, else a float64 deep copy (same values, upcast),
    for the oracle to differentiate (the copy's TENGraD hooks, if any, do nothing: hookset.OwnHook)."""
    if all(p.dtype == torch.float64 for p in model.parameters()):
        return model
    return copy.deepcopy(model).to(torch.float64)


def _f64(t):
    return t.to(torch.float64) if t is not None and t.is_floating_point() else t


def run_against_oracle(kind, fisher, loss, k, sizes, lr=0.3, damping=0.5, tol=1e-8, model=None,
                       **opt_kwargs):
    """Run len(sizes) steps and check each parameter change against the float64 oracle (on a float64
    twin of the model and the upcast batch); returns the optimizer."""
    model = make_model(kind) if model is None else model
    opt_kwargs.setdefault("kl_clip", None)      # the exact step: no KL clipping
    opt_kwargs.setdefault("check", True)     # J^T 1/m == param.grad on every curvature step
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, lr, damping, momentum=0.0, update_freq=k, fisher=fisher,
                      generator=torch.Generator().manual_seed(2), **{"prior": None, "step_rule": "natural", **opt_kwargs})
    F_stored = names = None
    errs = []
    for s, m in enumerate(sizes):
        x, y = make_batch(kind, m, loss, gen, dtype=next(model.parameters()).dtype)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        twin, x64, y64 = float64_twin(model), _f64(x), _f64(y)
        rows = per_sample_grads(twin, x64, y64, loss)
        g = {n: t.mean(0) for n, t in rows.items()}
        out = model(x)
        opt.zero_grad()
        if fisher == "empirical" and s % 2 == 0:
            LOSSES[loss](out, y).backward()          # the plain path
        else:
            opt.backward(out, y, loss=loss)
        if s % k == 0:
            if fisher == "empirical":                # the same rows as g's
                names = [n for n, p in twin.named_parameters() if p.requires_grad]
                F_stored = fisher_from_grads(rows, names)
            else:
                F_stored, names = oracle_fisher(twin, x64, y64, fisher, loss, labels=_f64(opt.last_labels))
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


def step_against_oracle(opt, model, x, y, damping):
    """One TENGraD step on (x, y) with the plain backward; returns the parameters' move, the dense
    oracle's exact step -lr d at the group's current lr, and D = sum <d, g> (d = (F_b + a I)^-1 g_b of
    this batch, empirical Fisher, cross-entropy)."""
    lr = opt.param_groups[0]["lr"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = per_sample_grads(model, x, y, "cross_entropy")
    g = {n: t.mean(0) for n, t in rows.items()}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    exact = expected_steps(opt, model, fisher_from_grads(rows, names), names, g, lr, damping)
    dg = sum(float((exact[n] / -lr * g[n]).sum()) for n in names)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    moved = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    return moved, exact, dg


def two_steps(schedule, kl_clip=1e-5, lr=0.3, damping=0.5, noise_scale=False):
    """On the token model: a first step, ``schedule(opt)`` (changes lr: a scheduler or by hand), then a
    second step against the oracle (``step_against_oracle``) at the lr the schedule left. Returns
    (opt, moved, exact, D, nu of the first step)."""
    model = make_model("tokens")
    opt = TENGraD(model, lr, damping, momentum=0.0, update_freq=1, kl_clip=kl_clip, noise_scale=noise_scale, prior=None)
    gen = torch.Generator().manual_seed(0)
    x, y = make_batch("tokens", 5, "cross_entropy", gen)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    after_first = opt.last_nu
    schedule(opt)
    moved, exact, dg = step_against_oracle(opt, model, *make_batch("tokens", 5, "cross_entropy", gen), damping)
    return opt, moved, exact, dg, after_first


def kept_prior_matrix(op) -> torch.Tensor:
    """D of one parameter from a block's kept prior entry (curvature/prior.py, eigenbasis.py): [P, P] in its
    eigenbasis, (Q_out (x) Q_in) diag(1 / s^2) (Q_out (x) Q_in)^T on the row-major flattened weight, else
    its diagonal 1 / s^2 shaped like the parameter."""
    if isinstance(op, eigenbasis.Rotated):
        q = torch.kron(op.q_out, op.q_in)
        return q @ torch.diag(op.s.reshape(-1) ** -2) @ q.T
    return op ** -2


def prior_batches(kind: str, n: int, seed: int) -> list:
    """``n`` cross-entropy batches of varying sizes (5-10 samples) for the prior tests (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return [make_batch(kind, m, "cross_entropy", gen) for m in [6, 5, 8, 6, 9, 6, 5, 8, 6, 10, 6, 5][:n]]
