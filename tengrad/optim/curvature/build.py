"""From a block's captured uses to its Jacobian rows: the one place the curvature rules live.

Every estimator builds a block's curvature through ``block_rows`` (then ``woodbury.curvature`` for
K and its factor, or, in the distributed exact step, the owner's factor over the ranks' rows):
single-process steps, staggered steps, blocks with several uses and both distributed modes. Given
the uses of one step (capture/record.py ``Use``):

1. No use received an output gradient: ``MissingCaptureError`` (consistency.py) naming the block.
   Uses from several root forwards (gradients accumulated over micro-batches, empirical Fisher): the
   rows of the union batch, M = the forwards' batches together, M * dL/dy each (``_union``).
2. Each use's sample is moved to dimension 0 (uses.py ``sample_first``; a declared ``batch_dim`` for
   the layer wins).
3. One module call of a block that trains all of its plan's parameters (the common case):
   the consistency check (J^T 1 / m == param.grad, the batch dimension; consistency.py), the output
   rows of the Fisher (fisher.py: gy = m * grad, or the curvature passes' rows, r = reps * m), the
   path (paths.py, from the plan's costs for these sizes, cached per block and sizes), and R held as
   x/gy ("reuse") or as the per-parameter Jacobians ("jacobian": J / m formed during the backward
   when the gradient came from the Jacobian, else ``plan.jacobian``).
4. Anything else (several calls, op-level uses, row slices, a plan parameter the block does not
   train): R = sum_u J_u formed explicitly (uses.py), checked against param.grad the same way.

``Rules`` carries the optimizer's options these steps need. ``keep_factors`` (the distributed exact
step) keeps x and gy beside an explicit J, as the owner may gather either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tengrad.layers.ops import module_leading_dims
from tengrad.optim.capture.record import Use
from tengrad.optim.curvature import paths, tokens, uses as uses_mod
from tengrad.optim.curvature.block import Block
from tengrad.optim.curvature.consistency import (ConsistencyCheck, cancelled, from_dots, graph_pass_error,
                                                 streamed_dots, unexplained)
from tengrad.optim.curvature.fisher import output_rows
from tengrad.optim.curvature.woodbury import Rows, compute_dtype
from tengrad.optim.errors import TENGraDError


@dataclass(frozen=True)
class Rules:
    fisher: str = "empirical"
    update_freq: int = 1
    max_jacobian_numel: int = 2 ** 26
    grad_from_jacobian: bool = False
    layer_dims: dict[str, int] = field(default_factory=dict)   # declared sample dim per layer name
    roofline: object = None     # roofline.Roofline: paths priced in seconds (flops and bytes), or flops only
    curvature_batch: int | str | None = None   # rows sampled per curvature step (None: all; "auto": budget.py)
    generator: object = None              # torch.Generator for those rows (None: torch's default)
    curvature_memory: int | str | None = None  # bytes of kept curvature (budget.py; None: no cap)
    prior: object = None                  # prior.Prior: a diagonal prior outside the rows (None: a I)
    token_rows: int | None = None         # rows per token, c positions sampled per step (tokens.py; None: samples)


def block_rows(b: Block, captured: list[Use], rules: Rules, check: ConsistencyCheck,
               keep_factors: bool = False, draw: tokens.Draw | None = None) -> Rows:
    """R of block ``b`` from its uses in this step (module docstring). ``draw`` (``rules.token_rows``): a
    block summed over uses whose inputs carry token dimensions gets its rows at the drawn positions
    (tokens.py); a module block's rows stay x and gy of the whole batch, for ``at_positions`` after the
    step's loss scale is known."""
    captured = [u for u in captured if u.received]
    if not captured:
        raise check.missing_capture(b)
    if check.mode is not None and any(u.jacobian_grad and u.graph_pass for u in captured):
        raise graph_pass_error(b)
    dtype = compute_dtype(b.params[0].dtype)
    moved = [sample_first(b, u, rules.layer_dims) for u in captured]
    by_forward: dict[int, list[Use]] = {}
    for u in moved:
        by_forward.setdefault(u.fwd, []).append(u)
    if draw is not None:
        for u, mu in zip(captured, moved):      # the leading dims after the sample moved first
            mu.lead = _lead(b, u) + mu.x.dim() - u.x.dim()
    if len(by_forward) > 1 and rules.fisher != "empirical":
        raise TENGraDError(
            f"layer {b.name!r} received output gradients from {len(by_forward)} forward passes since the "
            f"last zero_grad()/step(): gradient accumulation is supported for the empirical Fisher, not "
            f"fisher={rules.fisher!r} (its curvature passes run per opt.backward)")
    one_call = all(len(us) == 1 and us[0].parts is None for us in by_forward.values())
    plain = (b.plan is not None and one_call
             and len(b.params) == len([p for _, p in b.plan.params if p.requires_grad]))
    if plain:
        use = moved[0] if len(moved) == 1 else _union(moved)
        per_token = draw is not None and tokens.use_layout(use) is not None
        return _module_rows(b, use, rules, check, dtype, keep_factors,
                            batch=None if len(moved) == 1 else int(use.x.shape[0]), whole_xgy=per_token)
    return _summed_rows(b, by_forward, rules, check, dtype, draw)


def _lead(b: Block, u: Use) -> int:
    """How many leading dims of the use's input may hold the sample (Use.lead, else the module's rule)."""
    return u.lead if u.lead is not None else module_leading_dims(b.module, u.x)


def at_positions(b: Block, rows: Rows, draw: tokens.Draw) -> Rows:
    """A module block's whole-batch x/gy rows at the drawn positions (tokens.py): x_s [c, 1.., f], gy_s
    sqrt(T) [c, 1.., o], c "samples"; the same rows when its input has no token dimensions, when they
    already are per position or an explicit J (a summed block, ``block_rows``), or for several rows per
    sample (the exact Fisher is refused with token_rows: options.py)."""
    if rows.tokens is not None or rows.explicit_held or rows.x is None or rows.reps != 1 or b.plan is None:
        return rows
    lead = module_leading_dims(b.module, rows.x)
    t = tokens.layout(rows.x, [rows.gy], lead)
    if t is None:
        return rows
    out = rows.at_positions(lead, t, draw(rows.m, t, rows.gy.device))
    b.choice = paths.PathChoice(paths.REUSE, f"x and gy at {out.m} of {rows.m} x {t} positions (tokens.py)")
    return out


def _union(uses: list[Use]) -> Use:
    """One use for the calls of several forwards (gradient accumulation): their samples side by side,
    the union batch M = sum of the forwards' batches. Rows are M * dL/dy (``_module_rows``), so
    J^T 1 / M is the accumulated gradient, and they are the per-sample gradients when that is the
    union batch's mean gradient (equal micro-batches with loss / k, or any with loss * m_j / M)."""
    x = torch.cat([u.x for u in uses])
    grad = torch.cat([u.grad for u in uses])
    return uses[0].moved(x, grad, [])


def sample_first(b: Block, u: Use, layer_dims: dict[str, int]) -> Use:
    """``u`` with its sample at dimension 0 (uses.sample_first); the same object when it is there."""
    if u.m is None or u.x.dim() == 0:
        return u
    lead = u.lead if u.lead is not None else module_leading_dims(b.module, u.x)
    declared = layer_dims.get(b.name)
    if (declared is None and not u.seq_first and u.x.shape[0] == u.m
            and all(u.x.shape[d] != u.m for d in range(1, lead))):
        return u
    ts = ([u.grad] if u.grad is not None else []) + list(u.rows)
    x, ts = uses_mod.sample_first(u.name, u.x, ts, u.m, lead, u.seq_first, declared, key=b.name)
    grad = ts.pop(0) if u.grad is not None else None
    return u.moved(x, grad, ts)


def _module_rows(b: Block, u: Use, rules: Rules, check: ConsistencyCheck, dtype: torch.dtype,
                 keep_factors: bool, batch: int | None = None, whole_xgy: bool = False) -> Rows:
    x = u.x.to(dtype) if u.x.is_floating_point() else u.x
    m = x.shape[0]
    check.verify(b, x, u.grad, batch, graph_pass=u.graph_pass)
    if rules.fisher == "empirical" and u.grad is not None:   # gy = m * grad, formed below if needed
        gy, gy_shape = None, tuple(u.grad.shape)
    else:
        gy = output_rows(f"layer {b.name!r}", rules.fisher, u.grad, u.rows, m, dtype)
        gy_shape = tuple(gy.shape)
    choice = b.choice = _choice(b, tuple(x.shape), gy_shape, rules, dtype)
    # with a curvature batch the explicit J is formed after the rows are sampled, for those rows only
    # (estimator/local.py ``sample_rows``): here the rows stay x and gy
    # ... and with rows per token (``whole_xgy``) they stay x and gy, taken at the positions (``at_positions``)
    explicit = choice.path == paths.JACOBIAN and rules.curvature_batch is None and not whole_xgy
    sampled = whole_xgy or (rules.curvature_batch is not None and rules.curvature_batch < m)   # a copy then
    if x is u.x and (keep_factors or (rules.update_freq > 1 and not explicit and not sampled and not u.made)):
        x = x.clone()   # kept for k steps: must not alias a batch buffer the caller may refill (an
        #                 activation the forward made is kept as it is: nothing else holds it after the step)
    from_jacobian = explicit and rules.grad_from_jacobian
    if b.capture is not None:       # next curvature step: detach its parameters for inputs of this shape
        b.capture.set_jacobian_grad(tuple(u.x.shape) if from_jacobian else None)
    if from_jacobian and u.jac is not None and not keep_factors:
        return Rows(paths.JACOBIAN, m, pieces=u.jac, scale=float(m))     # the record holds J / m
    if gy is None and explicit and not keep_factors:
        return Rows(paths.JACOBIAN, m, pieces=b.plan.jacobian(x, u.grad.to(dtype)), scale=float(m))
    if gy is None:
        gy = output_rows(f"layer {b.name!r}", rules.fisher, u.grad, u.rows, m, dtype)
    rows = Rows(paths.REUSE, m, x, gy)
    return rows.explicit(b.plan) if explicit else rows


def _choice(b: Block, x_shape: tuple, gy_shape: tuple, rules: Rules, dtype: torch.dtype) -> paths.PathChoice:
    """The block's path for these sizes (paths.py, cached per block and sizes), or x and gy when the
    memory budget moved it there (``Block.memory_reuse``, curvature/budget.py)."""
    m = x_shape[0]
    reps = gy_shape[0] // m                                   # [C*m, ...], row c*m + i
    key = ((reps * m, *x_shape[1:]), tuple(gy_shape))
    choice = b.choices.get(key)
    if choice is None:              # pricing runs the cost model: once per block and sizes
        choice = b.choices[key] = paths.choose(b.plan, key[0], key[1], b.numel, rules.update_freq,
                                               rules.max_jacobian_numel, rules.roofline, dtype.itemsize)
    if choice.path == paths.JACOBIAN and b.memory_reuse:    # moved to x and gy by the memory budget
        choice = memory_choice(choice)
    return choice


def forms(b: Block, captured: list[Use], rules: Rules) -> tuple[str, int, int | None, int]:
    """What ``block_rows`` would build for block ``b`` from these uses, from their sizes alone (nothing is
    formed; curvature/budget.py prices the step's memory with it): (the path, the bytes of the explicit
    J = r P s, the bytes of x and gy = (|x| + |gy|) s or None when the block has no such form, the
    samples m). s: the compute dtype's bytes (integer ids keep theirs); r: the rows (m, or C m)."""
    sh = _shapes(b, captured, rules)
    if sh is None:
        return paths.JACOBIAN, 0, None, 0
    m, s, x_shape, gy_shape, x_size = sh
    if x_shape is None:           # R = sum_u J_u, explicit (``_summed_rows``)
        return paths.JACOBIAN, m * b.numel * s, None, m
    choice = _choice(b, x_shape, gy_shape, rules, compute_dtype(b.params[0].dtype))
    return choice.path, gy_shape[0] * b.numel * s, math.prod(x_shape) * x_size + math.prod(gy_shape) * s, m


def seconds(b: Block, captured: list[Use], rules: Rules) -> paths.StepSeconds | None:
    """What a reuse step of block ``b`` costs in each form, and its forward, priced from these uses'
    sizes by the roofline (paths.py ``step_seconds``; curvature/budget.py's time rule); None without a
    roofline or a capture."""
    sh = _shapes(b, captured, rules) if rules.roofline is not None else None
    if sh is None:
        return None
    m, s, x_shape, gy_shape, _ = sh
    if x_shape is None:           # an explicit J summed over uses: no x/gy form, its forward not priced
        return paths.StepSeconds(paths.matvec_seconds(m * b.numel, s, rules.roofline), None, 0.0)
    x_rep = (gy_shape[0], *x_shape[1:])     # x repeated to gy's rows (the exact / MC Fisher's C m rows)
    return paths.step_seconds(b.plan, x_rep, gy_shape, b.numel, rules.roofline, s, samples=m)


def _shapes(b: Block, captured: list[Use], rules: Rules):
    """(m, s, the x shape, the gy shape, x's bytes per element) of the rows these uses give, x and gy
    shapes None when R is summed over uses (several calls, op-level uses: ``_summed_rows``); None
    without a use that received an output gradient."""
    captured = [u for u in captured if u.received]
    s = compute_dtype(b.params[0].dtype).itemsize
    if not captured:
        return None
    moved = [sample_first(b, u, rules.layer_dims) for u in captured]
    by_forward: dict[int, list[Use]] = {}
    for u in moved:
        by_forward.setdefault(u.fwd, []).append(u)
    one_call = all(len(us) == 1 and us[0].parts is None for us in by_forward.values())
    plain = (b.plan is not None and one_call
             and len(b.params) == len([p for _, p in b.plan.params if p.requires_grad]))
    m = sum(int(us[0].x.shape[0]) for us in by_forward.values())
    if not plain:
        return m, s, None, None, s
    x = moved[0].x
    x_shape = (m, *x.shape[1:])
    if rules.fisher == "empirical" and all(u.grad is not None for u in moved):
        gy_shape = (m, *moved[0].grad.shape[1:])
    else:                         # the curvature passes' rows, concatenated (fisher.output_rows)
        rows = moved[0].rows
        gy_shape = (len(rows) * m, *rows[0].shape[1:]) if rows else (m, *moved[0].grad.shape[1:])
    return m, s, x_shape, gy_shape, (s if x.is_floating_point() else x.element_size())


def summed(b: Block, captured: list[Use], rules: Rules) -> bool:
    """Whether ``block_rows`` sums this block's J over uses (several calls, op-level uses, slices)."""
    sh = _shapes(b, captured, rules)
    return sh is not None and sh[2] is None


def memory_choice(priced: paths.PathChoice) -> paths.PathChoice:
    """The path of a block the memory cap moved from its explicit J to x and gy (curvature/budget.py)."""
    return paths.PathChoice(paths.REUSE, "x and gy kept: the J's would exceed curvature_memory "
                            f"(curvature/budget.py; priced: {priced.note})")


def _summed_rows(b: Block, by_forward: dict[int, list[Use]], rules: Rules, check: ConsistencyCheck,
                 dtype, draw: tokens.Draw | None = None) -> Rows:
    """R = sum_u J_u over several uses, op-level uses or slices (uses.py); the rows of several
    forwards (gradient accumulation) stacked, each scaled to M * dL/dy as in ``_union``; with ``draw``
    and uses that all carry the same token dimensions, the rows of the drawn positions (tokens.py)."""
    whole = [(p, None) if any(p is q for q in b.params) else None for _, p in b.plan.params] \
        if b.plan is not None else None
    empirical = rules.fisher == "empirical"
    groups = []
    for calls in by_forward.values():
        calls = [c if c.parts is not None else _with_parts(c, whole) for c in calls]
        m = int(calls[0].x.shape[0])
        if any(int(c.x.shape[0]) != m for c in calls):
            raise TENGraDError(f"layer {b.name!r}: its uses saw batches {[int(c.x.shape[0]) for c in calls]}")
        groups.append((m, calls))
    t = _summed_layout(groups) if draw is not None else None
    if t is not None:
        return _summed_positions(b, groups, t, draw, check, dtype, empirical)
    M = sum(m for m, _ in groups)
    J = torch.cat([uses_mod.jacobian(b.params, calls, m, dtype, empirical) * (M / m) if len(groups) > 1
                   else uses_mod.jacobian(b.params, calls, m, dtype, empirical) for m, calls in groups])
    calls_all = [c for _, calls in groups for c in calls]
    grads = [c.grad for c in calls_all if c.grad is not None]
    if check.due(b.name) and grads:
        Jg = J if empirical else uses_mod.jacobian(b.params, calls_all, M, dtype, True)
        uses_mod.check(b.name, b.params, Jg, M, grads[0].dtype)
        check.mark_checked(b.name)
    b.choice = paths.PathChoice(paths.JACOBIAN, f"explicit J summed over {len(calls_all)} use(s), uses.py")
    b.uses = [c.name for c in calls_all]
    return Rows(paths.JACOBIAN, M, jac=J)


def _summed_layout(groups: list) -> int | None:
    """T when every use of the block's forwards has the same T positions per sample (tokens.layout),
    else None."""
    ts = {tokens.use_layout(c) for _, calls in groups for c in calls}
    return ts.pop() if len(ts) == 1 and None not in ts else None


def _summed_positions(b: Block, groups: list, t: int, draw: tokens.Draw, check: ConsistencyCheck, dtype,
                      empirical: bool) -> Rows:
    """R [c, P] = sum_u J_u at the drawn positions (every use at the same ones; tokens.py). The check
    (J^T 1 / m == param.grad) runs on the whole batch's per-sample J when it is due."""
    if len(groups) > 1:
        raise TENGraDError(
            f"layer {b.name!r} received output gradients from {len(groups)} forward passes since the last "
            "zero_grad()/step(): token_rows takes the positions of one forward for a block read by several "
            "calls or ops; call step() after each forward's backward, or token_rows=None")
    m, calls = groups[0]
    idx = draw(m, t, calls[0].x.device)
    c = draw.rows(m, t)
    J = uses_mod.jacobian(b.params, [tokens.use_at(u, u.lead, idx, t, m) for u in calls], c, dtype, empirical)
    grads = [u.grad for u in calls if u.grad is not None]
    if check.due(b.name) and grads:
        uses_mod.check(b.name, b.params, uses_mod.jacobian(b.params, calls, m, dtype, True), m, grads[0].dtype)
        check.mark_checked(b.name)
    b.choice = paths.PathChoice(paths.JACOBIAN, f"explicit J summed over {len(calls)} use(s) at {c} of {m} x {t} "
                                                "positions, uses.py, tokens.py")
    b.uses = [u.name for u in calls]
    rows = Rows(paths.JACOBIAN, c, jac=J)
    rows.tokens = t
    return rows


def _with_parts(u: Use, parts) -> Use:
    out = u.moved(u.x, u.grad, u.rows)
    out.parts = parts
    return out


def jacobian_grad(b: Block, u: Use, grad: Tensor) -> None:
    """Called during backward for a call whose parameters were detached (capture/module.py): forms
    J / m = plan.jacobian(x, dL/dy), keeps it on the use and adds its column sums to p.grad."""
    dtype = compute_dtype(b.params[0].dtype)
    with torch.no_grad(), torch.autocast(device_type=grad.device.type, enabled=False):
        x = u.x.to(dtype) if u.x.is_floating_point() else u.x
        jac = b.plan.jacobian(x, grad.to(dtype))
        for (_, p), j in zip(b.plan.params, jac):
            if not p.requires_grad:     # frozen since the plan was made: no gradient, never moves
                continue
            gp = j.sum(0).to(p.dtype)
            if p.grad is None:
                p.grad = gp
            else:
                p.grad.add_(gp)
    u.jac = list(jac) if u.jac is None else [a + c for a, c in zip(u.jac, jac)]
    getattr(b.plan, "unbind", lambda: None)()   # the binding would keep this x and gradient alive past the backward


#: a factor within this relative distance of a power of two 2^k (k >= 1) is taken for a loss scale
SCALE_TOL = 1e-4


def loss_scale(b: Block, rows: Rows, tol: float | None = None) -> float | None:
    """The loss scale S the captured rows carry, or 1: the factor between the gradient the rows imply
    (J^T 1 / m, the output gradients as the backward saw them) and ``param.grad`` as the step sees it,
    when that factor is a power of two 2^k, k >= 1, to ``SCALE_TOL``. That is what a loss scaled before
    backward and its gradients unscaled before the step leave (torch.amp.GradScaler's scales are powers
    of two; ``(loss * s).backward()`` then ``p.grad /= s`` with s = 2^k), while the factor that gradient
    clipping leaves (clip_grad_norm_'s max_norm / norm) is kept: the step then preconditions the
    clipped gradient with the Fisher of the unclipped rows, as without clipping. Empirical rows only
    (r = m); a block with no gradient or a non-finite one: 1. None when the block cannot tell: its
    param.grad is zero or the roundoff of a sum that cancels (consistency.cancelled: the bias of a layer
    a BatchNorm follows), whose ratio to J^T 1 / m is noise (estimator/local.py asks the next block).

    ``tol``: also check that param.grad is that factor times J^T 1 / m to ``tol`` (consistency.mismatch),
    else raise ``UnexplainedGradientError`` (a gradient penalty; the check on every curvature step)."""
    if rows.n_rows != rows.m or rows.tokens is not None:
        return 1.0
    grads = [p.grad for p in b.params]
    if any(g is None for g in grads):
        return 1.0
    like = [g.to(rows.gy.dtype if rows.gy is not None else g.dtype) for g in grads]
    ones = torch.full((rows.m,), 1.0 / rows.m, dtype=like[0].dtype, device=like[0].device)
    dots = streamed_dots(list(zip(rows.jtu(b.plan, ones, like), grads)))   # float64 sums, no copies
    if dots is None:
        return 1.0
    aa, ww, aw = dots
    if not ww > 0:
        return None
    reach = rows.magnitudes_jtu(b.plan, ones, like)
    if cancelled(math.sqrt(aa), math.sqrt(sum(float(t.double().square().sum()) for t in reach)), ones.dtype):
        return None
    if tol is not None:
        unexplained(b, *from_dots(aa, ww, aw), tol)
    f = aw / ww
    if not f >= 2 - 2 * SCALE_TOL:
        return 1.0
    k = round(math.log2(f))
    return float(2 ** k) if abs(f / 2 ** k - 1) <= SCALE_TOL else 1.0
