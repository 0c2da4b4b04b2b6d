"""A diagonal prior outside the rows (``TENGraD(..., prior="adam")``; issue 24, item 3).

The plain step damps every direction the rows do not span by the same a: d = (F + a I)^-1 g, so a
gradient part outside the rows of an m-sample Fisher is stepped as g / a (SGD). With a diagonal prior
D = diag(delta), delta > 0 over a block's P parameters, the step is

    d = (R^T R / m + a D)^-1 g,

and with S = D^-1/2 the change of variables theta = S theta' makes it the plain damped step of the rows
R' = R S [r, P]:

    (R^T R / m + a D)^-1 g = S (R'^T R' / m + a I)^-1 S g
                           = S (1/a) (g' - R'^T (K' + m a I)^-1 R' g'),   g' = S g,
    K' = R' R'^T = R D^-1 R^T  [r, r]

(the Woodbury form of the issue, D^-1 - D^-1 R^T (m a I + R D^-1 R^T)^-1 R D^-1, times 1/a). So a block
with a prior keeps R' in place of R (its Gram is K'; checkpoints and checks see R'), scales g by S
before the solve and the solution by S after (estimator/local.py). The step is exact for any delta > 0.
delta is taken at the block's curvature step and kept with its rows (``Rows.prior`` = S per parameter):
reuse steps are exact for the kept (F, D).

delta, ``prior="adam"``: second moments v = beta v + (1 - beta) g^2, updated every step from param.grad
(``SecondMoments``, kept in the optimizer state as ``"prior_v"``) from v_1 = g_1^2. That is not Adam's
bias-corrected v (v_0 = 0, which the normalisation below would make v_1 = (1 - beta) g_1^2): here the
first gradient weighs 1 / (1 - beta) times as much, still 30% of v after 1,200 steps at beta 0.999.
Measured on the LM task (lab/lm_prior_probe.py, 150 steps, docs/experiments/lm-prior-soap.md), Adam's
weighting was worse: training loss 3.03 against 2.64, with a spike to 7.6 at step 44. From v,

    delta = max(sqrt(v) / mean_block(sqrt(v)), floor)

normalised to mean 1 over the block, so the damping a keeps its scale: outside the rows
d = g / (a delta), Adam's direction up to the factor a mean(sqrt v) (the KL clip sets the length).

Forms of R' (``apply``):

* an explicit J [r, P] (or its per-parameter pieces): column j scaled by S_j (one copy of J);
* x [m, ..., i] and gy [r, ..., o] of an ``nn.Linear`` (weight [o, i], bias [o]) or of an ``nn.Conv*d``
  with groups 1 (weight [o, i, k...]; channels on dim 1): a Kronecker-diagonal delta,
  delta[o, i, k] = delta_out[o] delta_in[i] (delta_bias[o] = delta_out[o]), from Adafactor's factoring of
  v: delta_out ~ sqrt(mean over (i, k) of v), delta_in ~ sqrt(mean over (o, k) of v), each normalised to
  mean 1 and floored. Then R' is the rows of x * delta_in^-1/2 (on the input-feature dim) and
  gy * delta_out^-1/2 (on the output-feature dim): the Gram keeps the paper's reuse form;
* any other x / gy block: its explicit J formed and scaled, when J has at most ``max_jacobian_numel``
  entries; else the block keeps the identity prior (D = I, its plain step) and ``Rows.prior_note`` says why.

``prior="soap"``: a block with a weight of 2 or more dims takes D in Shampoo's eigenbasis for its weights
(``rotated``; the maths in curvature/eigenbasis.py) and this diagonal for its other parameters; the
blocks without such a weight (LayerNorm, biases alone) are as under "adam".
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from tengrad.optim.curvature import eigenbasis
from tengrad.optim.curvature.woodbury import Rows

DEFAULT_BETA = 0.999            # prior="adam"'s decay of v (Adam's beta2)
SOAP_BETA = 0.95                # prior="soap"'s (SOAP's beta2; docs/experiments/lm-prior-soap.md)
DEFAULT_FLOOR = 1e-2
UPDATE_CLIP = 1.0               # step_rule="adam": a block's d has RMS at most this (``clip_rms_``)


def default_beta(prior: str | None) -> float:
    """``prior_beta`` when not given: each prior's own method's beta2."""
    return SOAP_BETA if prior == "soap" else DEFAULT_BETA


@dataclass(frozen=True, eq=False)
class Prior:
    """What a step needs of the prior: its kind, floor and the optimizer state holding v (build.Rules)."""

    kind: str
    floor: float
    state: dict
    current: float | None = None    # step_rule="adam": v's beta, to fold this step's gradient into v first

    def rows(self, rows: Rows, block, max_jacobian_numel: int, on_factors: str | None = None) -> Rows:
        """R' of ``block`` under this prior; ``on_factors``: why the rows must stay on x and gy (the memory
        budget moved the block), so a D that needs an explicit J gives way to the identity prior."""
        if self.rotates(block):
            return rotated(rows, block, self.state, self.floor, max_jacobian_numel, self.current, on_factors)
        return apply(rows, block, self.state, self.floor, max_jacobian_numel, self.current, on_factors)

    def decide(self, block, uses, samples: int, total: int | None = None) -> None:
        """prior="soap": which of ``block``'s weights take the eigenbasis (eigenbasis.decide, once per weight),
        from the output gradients its captured ``uses`` hold for this batch of ``samples`` (all their
        elements over the samples: a sequence-first use, MultiheadAttention's in-projection, holds [T, m, o])
        and the batch ``total`` it is priced for (default ``samples``; the distributed step gives the
        global batch, so every rank decides alike)."""
        if self.kind == "soap":
            out = sum(u.grad.numel() for u in uses if u.grad is not None)
            eigenbasis.decide(self.state, block.params, out // max(samples, 1) or None,
                              samples if total is None else total)

    def rotates(self, block) -> bool:
        """Whether ``block`` has a weight in the eigenbasis (prior="soap", ``decide``)."""
        return self.kind == "soap" and any(eigenbasis.rotates(self.state, p) for p in block.params)

    def needs_jacobian(self, block) -> bool:
        """Whether this prior keeps ``block``'s rows as an explicit J (rotated, or scaled per entry), not
        as x and gy (Adafactor's Kronecker scaling of a Linear's or a groups-1 Conv's)."""
        if self.kind == "soap" and any(eigenbasis.rotates(self.state, p, undecided=True)   # the first step: as
                                       for p in block.params):                               # rotated
            return True
        return block.plan is None or kronecker_layer(block.module, block.params) is None


class SecondMoments:
    """v = beta v + (1 - beta) g^2 per parameter (``state[p]["prior_v"]``, the compute dtype), one foreach
    update per step over every parameter with a gradient."""

    def __init__(self, beta: float = DEFAULT_BETA) -> None:
        self.beta = float(beta)

    def update(self, state: dict, params: Sequence[Tensor], dtype_of, step: int = 0) -> None:
        vs, gs = [], []
        for p in params:
            if p.grad is None:
                continue
            g = _dense_grad(p)
            st = state[p]
            v = st.get("prior_v")
            if v is None:
                st["prior_v"] = g.to(dtype_of(p.dtype)).square()     # v_1 = g_1^2 (module docstring)
                continue
            vs.append(v)
            gs.append(g.to(v.dtype))
        if vs:
            torch._foreach_mul_(vs, self.beta)
            torch._foreach_addcmul_(vs, gs, gs, value=1.0 - self.beta)


def diagonal(vs: Sequence[Tensor], floor: float) -> list[Tensor]:
    """delta per parameter of a block: sqrt(v) / (the block's mean of sqrt(v)), floored; all ones when
    v is all zero."""
    return normalised(vs, floor)[0]


def normalised(vs: Sequence[Tensor], floor: float) -> tuple[list[Tensor], Tensor | None]:
    """(delta per parameter, the block's mean of sqrt(v)) as ``diagonal``; the mean None when v is all
    zero (delta all ones)."""
    s = [v.clamp(min=0).sqrt() for v in vs]
    n = sum(t.numel() for t in s)
    mean = sum(t.sum() for t in s) / max(n, 1)
    if not bool(mean > 0):
        return [torch.ones_like(t) for t in s], None
    return [(t / mean).clamp_(min=floor) for t in s], mean


def adam_scale(damping: float, mean: Tensor | None) -> float | Tensor:
    """step_rule="adam": the factor a / mean_b sqrt(v) on a block's d = (F + a D)^-1 m, so that outside the
    rows d = m'' / (delta mean_b sqrt(v)) = m'' / sqrt(v) per coordinate (floored): SOAP's step at lr, while
    the rows weigh in as in the damped solve. Together: d = (F mean_b / a + Q diag(max(sqrt v, floor mean_b))
    Q^T)^-1 m; under Adafactor's Kronecker-diagonal D (``kronecker``) mean_b is its c, under the identity
    prior (``identity``) D = I and outside the rows d = m / mean_b. mean None (the identity prior before the
    eigenbasis, or v all zero): 1, TENGraD's own damped step on m, d = (F + a I)^-1 m. A 0-dim tensor
    otherwise (no host sync on the step's path)."""
    return 1.0 if mean is None else float(damping) / mean


def clip_rms_(d: Sequence[Tensor], threshold: float = UPDATE_CLIP) -> None:
    """step_rule="adam": a block's d divided by max(1, RMS(d) / threshold) in place, RMS over the whole
    block: Adafactor's update clipping (Shazeer and Stern, 2018, threshold 1). D is kept between curvature
    steps while v moves, so a coordinate whose v was small at the curvature step (a ReLU unit dead for that
    batch: delta at the floor) steps m / (floor mean_b) on the next steps, unbounded by the current v as in
    Adam; on 3C1F that diverged in 5 steps (docs/experiments/lm-prior-soap.md). No host sync."""
    scale_clip_([list(d)], [1.0], threshold)


def scale_clip_(blocks: Sequence[Sequence[Tensor]], scales: Sequence[float | Tensor],
                threshold: float = UPDATE_CLIP) -> None:
    """Every block's d_b times c_b / max(1, c_b RMS(d_b) / threshold) in place: d_b scaled by its
    ``adam_scale`` c_b > 0, then clipped as ``clip_rms_`` (RMS(c d) = c RMS(d)). One foreach norm and one
    foreach product over all blocks' tensors (a step of a many-block net paid ~0.1 ms of small kernels a
    block for the two), no host sync."""
    flat = [t for d in blocks for t in d]
    if not flat:
        return
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in flat])
    device = flat[0].device
    sq = torch.stack([n.to(dtype) for n in torch._foreach_norm(flat)]).square()
    owner = torch.tensor([b for b, d in enumerate(blocks) for _ in d], device=device)
    sums = torch.zeros(len(blocks), dtype=dtype, device=device).index_add_(0, owner, sq)
    numel = torch.tensor([max(sum(t.numel() for t in d), 1) for d in blocks], dtype=dtype, device=device)
    c = torch.stack([torch.as_tensor(s, dtype=dtype, device=device) for s in scales])
    factor = c / (c * (sums / numel).sqrt() / threshold).clamp(min=1.0)
    per = factor.index_select(0, owner).unbind()
    for want in {t.dtype for t in flat}:        # one product per dtype (the factors in the tensors' own)
        ts = [(t, f.to(want)) for t, f in zip(flat, per) if t.dtype == want]
        torch._foreach_mul_([t for t, _ in ts], [f for _, f in ts])


def adam_direction(prior: Prior, p: Tensor, m: Tensor) -> Tensor:
    """step_rule="adam" for a parameter outside every block's rows (a fallback parameter, or a block's
    parameters on a step without its rows): Adam's step, the block form with no rows,
    (a / mean)(a D)^-1 m = m / max(sqrt v', floor mean sqrt v') with v' = beta v + (1 - beta) g^2 (v_1 = g^2:
    the first step is sign(g) for m = g), clipped to RMS <= 1 (``clip_rms_``); m itself when v' is all zero."""
    v = with_current(second_moment(prior.state, p, m.dtype), p, prior.current).reshape(m.shape)
    (delta,), mean = normalised([v], prior.floor)
    d = m.clone() if mean is None else m / (delta * mean)
    clip_rms_([d])
    return d


def with_current(v: Tensor, p: Tensor, beta: float, basis: tuple | None = None) -> Tensor:
    """v folded with this step's gradient, beta v + (1 - beta) g^2 (g rotated, Q_out^T G Q_in, for a weight in
    its eigenbasis ``basis`` = (Q_out, Q_in, v)), a new tensor: step_rule="adam" takes D from the second
    moments of the step's own gradient as Adam does (the state is updated after the step, as always)."""
    if p.grad is None:
        return v
    g = _dense_grad(p).to(v.dtype)
    if basis is not None:
        g = basis[0].t().to(v.dtype) @ g.reshape(v.shape) @ basis[1].to(v.dtype)
    return v * beta + g.reshape(v.shape).square() * (1.0 - beta)


def kronecker(v_weight: Tensor, floor: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """(delta_out [o], delta_in [i], c) from v of a weight [o, i, k...] (Adafactor's row and column means):
    with r_o = mean_{i,k} v, c_i = mean_{o,k} v, delta_out = sqrt(r) / mean_o sqrt(r) and delta_in likewise
    (floored), and c = mean_o sqrt(r) mean_i sqrt(c) / sqrt(mean v), so that c delta_out[o] delta_in[i] =
    sqrt(r_o c_i / mean v), Adafactor's factored sqrt(v), where no floor binds: the block scale of
    step_rule="adam" (``adam_scale``). c is None when v is all zero."""
    dims_out = tuple(d for d in range(v_weight.dim()) if d != 0)
    dims_in = tuple(d for d in range(v_weight.dim()) if d != 1)
    (d_out,), m_out = normalised([v_weight.mean(dims_out)], floor)
    (d_in,), m_in = normalised([v_weight.mean(dims_in)], floor)
    mean_v = v_weight.mean()
    c = None if m_out is None or m_in is None or not bool(mean_v > 0) else m_out * m_in / mean_v.sqrt()
    return d_out, d_in, c


def kronecker_layer(module: nn.Module, params: Sequence[Tensor]) -> str | None:
    """"linear" or "conv" when block rows of ``module`` over ``params`` can be scaled as x and gy, else None."""
    own = [module.weight] + ([module.bias] if getattr(module, "bias", None) is not None else [])
    if len(params) != len(own) or any(p is not q for p, q in zip(params, own)):
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1:
        return "conv"
    return None


def rotated(rows: Rows, block, state: dict, floor: float, max_jacobian_numel: int,
            current: float | None = None, on_factors: str | None = None) -> Rows:
    """R'' = R T^T for ``block`` under ``prior="soap"`` (curvature/eigenbasis.py): rotatable weights in
    their eigenbasis, the other parameters diagonal, delta normalised over the whole block; the rows
    as an explicit J (formed from x and gy when it has at most ``max_jacobian_numel`` entries, else the
    identity prior with a note)."""
    dtype = rows_dtype(rows)
    turn = [eigenbasis.rotates(state, p) for p in block.params]
    ready = all(not t or "prior_ql" in state.get(p, {}) for t, p in zip(turn, block.params))
    bases = [eigenbasis.basis(state, p) if ready and t else None for t, p in zip(turn, block.params)]
    vs = [b[2] if b is not None else second_moment(state, p, dtype) for p, b in zip(block.params, bases)]
    if current is not None:
        vs = [with_current(v, p, current, b) for v, p, b in zip(vs, block.params, bases)]
    if not rows.explicit_held:
        if on_factors is not None:
            return identity(rows, f"identity prior: {on_factors}; the eigenbasis prior rotates explicit rows only "
                                  "(eigenbasis.py)", vs if current is not None else None)
        if rows.n_rows * block.numel > max_jacobian_numel or block.plan is None:
            return identity(rows, f"identity prior: its J ({rows.n_rows} x {block.numel}) exceeds "
                                  "max_jacobian_numel; the eigenbasis prior rotates explicit rows only (eigenbasis.py)",
                            vs if current is not None else None)
        rows = rows.explicit(block.plan)
    if not ready:       # step 0: the bases of one gradient make the other directions' delta the floor
        # and, unscaled under step_rule="adam", d = (F + a I)^-1 m (``identity``)
        return identity(rows, "identity prior: no eigenbasis before the first step's statistics (eigenbasis.py)")
    deltas, mean = normalised(vs, floor)
    out = rows.transformed([eigenbasis.Rotated(b[0], b[1], d.rsqrt()) if b is not None else d.rsqrt()
                            for b, d in zip(bases, deltas)])
    out.prior_mean = mean
    return out


def apply(rows: Rows, block, state: dict, floor: float, max_jacobian_numel: int,
          current: float | None = None, on_factors: str | None = None) -> Rows:
    """R' = R S for ``block`` (module docstring), with delta from ``state[p]["prior_v"]``; the result
    carries S (``Rows.prior``, per parameter, shaped like it) or, for the identity prior, None and a note."""
    params = block.params
    vs = [second_moment(state, p, rows_dtype(rows)) for p in params]
    if current is not None:
        vs = [with_current(v, p, current) for v, p in zip(vs, params)]
    if not rows.explicit_held:
        kind = kronecker_layer(block.module, params) if block.plan is not None else None
        if kind is not None:
            d_out, d_in, c = kronecker(vs[0], floor)
            s_out, s_in = d_out.rsqrt(), d_in.rsqrt()
            w = params[0]
            weight_s = s_out.reshape(-1, *[1] * (w.dim() - 1)) * s_in.reshape(1, -1, *[1] * (w.dim() - 2))
            s = [weight_s.expand_as(w).contiguous()] + ([s_out.clone()] if len(params) > 1 else [])
            if kind == "linear":        # x [m, ..., i], gy [r, ..., o]
                out = rows.feature_scaled(s_in, rows.x.dim() - 1, s_out, rows.gy.dim() - 1, s)
            else:                       # conv: channels on dim 1
                out = rows.feature_scaled(s_in, 1, s_out, 1, s)
            out.prior_mean = c
            return out
        if on_factors is not None:
            return identity(rows, f"identity prior: {on_factors}, and its layer has no Kronecker form (prior.py)",
                            vs if current is not None else None)
        if rows.n_rows * block.numel > max_jacobian_numel or block.plan is None:
            return identity(rows, f"identity prior: its J ({rows.n_rows} x {block.numel}) exceeds "
                                  f"max_jacobian_numel and its layer has no Kronecker form (prior.py)",
                            vs if current is not None else None)
        rows = rows.explicit(block.plan)
    deltas, mean = normalised(vs, floor)
    out = rows.transformed([d.rsqrt() for d in deltas])
    out.prior_mean = mean
    return out


def identity(rows: Rows, note: str, vs: Sequence[Tensor] | None = None) -> Rows:
    """The block's rows under the identity prior D = I, with ``note`` saying why. A block that keeps it for
    good (its J over max_jacobian_numel) passes, under step_rule="adam", ``vs``: its v with the step's
    gradient folded in (a rotated weight's in its eigenbasis when it has one), and the rows keep the mean
    over the block of sqrt(v) as ``prior_mean``: its step (a / mean_b) (F + a I)^-1 m is then Adam's step
    with one second moment per block outside the rows (``adam_scale``), on the scale of the blocks with a
    prior, rather than m / a. Before the eigenbasis (the first cycle of update_freq steps) the step stays
    unscaled, (F + a I)^-1 m: scaled from step 0's v alone, the LM probe's training loss at step 300 went
    from 1.66 to 2.46 (docs/experiments/lm-prior-soap.md)."""
    out = rows.scaled(1.0)
    out.prior_note = note
    if vs is not None:
        out.prior_mean = normalised(vs, 0.0)[1]
    return out


def second_moment(state: dict, p: Tensor, dtype: torch.dtype) -> Tensor:
    """v of ``p``; before its first update (the first step) the current gradient's square, as Adam's
    bias-corrected v_1 = g_1^2 (ones when ``p`` has no gradient)."""
    v = state[p].get("prior_v") if p in state else None
    if v is not None:
        return v
    if p.grad is None:
        return torch.ones_like(p, dtype=dtype)
    return _dense_grad(p).to(dtype).square()


def _dense_grad(p: Tensor) -> Tensor:
    """param.grad, detached and dense (Embedding(sparse=True) gives a sparse one)."""
    g = p.grad.detach()
    return g.to_dense() if g.is_sparse else g


def rows_dtype(rows: Rows) -> torch.dtype:
    for t in (rows.jac, rows.gy, rows.pieces[0] if rows.pieces is not None else None):
        if t is not None:
            return t.dtype
    return torch.float32
