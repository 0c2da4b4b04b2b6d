"""The last part of a TENGraD step: the gradient with weight decay, one finiteness check, the
step-size control (KL clip with the noise ratio) and the momentum update.

Gradient (``gradient``): g = param.grad (dense, compute dtype) + weight_decay * theta (coupled decay:
the step is the damped natural gradient of loss + (weight_decay/2)||theta||^2).

Step-size control (K-FAC's KL clipping, on by default): with D = sum over all parameters of
lr_b^2 <d, g> (lr_b the lr of the parameter's group; <d, g> = g^T (F_b + a I)^-1 g >= 0 per block),

    nu = min(1, sqrt(kl_clip / D))

so the new contribution lr_b nu d to the update has squared length nu^2 D <= kl_clip in the
damped-Fisher metric (a second-order bound on the KL divergence between the model's predictive
distributions before and after the step). Steps already inside the bound are exact (nu = 1);
``kl_clip=None`` switches the control off and every step is the exact damped natural-gradient step.

Learning-rate schedules. Measured with the current lr, a clipped step lr nu d = sqrt(kl_clip / <d, g>) d
would not depend on lr at all, and a decaying schedule would do nothing while the clip is active (at
the defaults it is active on almost every step). So D is measured with each group's *reference* lr

    lr_ref = max(lr_ref of the previous steps, lr, the scheduler's base lr ``initial_lr`` if set)

(kept in the group as ``"kl_clip_lr"``, saved with the state_dict): nu = min(1, sqrt(kl_clip / D_ref))
and the update is lr_b nu d_b. At a constant lr this is the rule above; when a scheduler (or the user)
lowers lr below lr_ref the step shrinks by lr / lr_ref, as SGD's does; since lr <= lr_ref the squared
length sum_b lr_b^2 nu^2 <d_b, g_b> stays <= kl_clip. A warm-up that starts below the scheduler's
base lr (LinearLR, LambdaLR) scales the step up to the base lr; OneCycleLR's ``initial_lr`` is
max_lr / div_factor, so while its lr rises the reference rises with it (the clip, not the warm-up,
bounds those steps) and its annealing phase shrinks the step.

``directions`` is a list of (param, d, g, group): d the preconditioned direction and g the gradient of
one parameter (compute dtype), group its param group (lr, momentum). For a large block d may be a
``Deferred`` shared by the block's parameters (consecutive entries): d = beta g + R^T u is never formed as
a tensor; <d, g> = beta |g|^2 + u^T (R g) comes from the solve's own R g, and ``apply`` forms nu d straight
into each momentum buffer (or parameter), so the step holds no parameter-sized d (issue 23: on the 4096
MLP d was 64 MiB, a third of SGD's working memory) and skips a write and a read of it.

Update (heavy ball, like torch.optim.SGD, per group)::

    buf  = momentum * buf + nu d          (buf = nu d on the first step)
    theta <- theta - lr * buf
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tengrad.optim.curvature import scratch
from tengrad.optim.errors import TENGraDError

Direction = tuple[Tensor, Tensor, Tensor, dict]

def gradient(p: Tensor, weight_decay: float, dtype: torch.dtype) -> Tensor:
    """param.grad (zeros when None; dense for Embedding(sparse=True)) + weight_decay * theta, in ``dtype``."""
    if p.grad is None:
        g = torch.zeros_like(p, dtype=dtype)
    else:
        g = p.grad.detach()
        g = g if g.dtype == dtype else g.to(dtype)      # a no-op .to() still costs a dispatch per parameter
    g = g.to_dense() if g.is_sparse else g
    return g + weight_decay * p.detach().to(dtype) if weight_decay else g


class Deferred:
    """d = beta g + R^T u of one block, kept as its parts (module docstring): ``rows`` (woodbury.Rows) and
    ``plan`` give R^T, ``u`` [r] the solve's u' (R's loss-scale factor is applied by ``rows``), ``rg`` = R g
    [r] (factor included), ``beta`` = 1 / damping, ``params`` and ``gs`` the block's parameters and their
    gradients (compute dtype, the parameters' own)."""

    def __init__(self, rows, plan, u: Tensor, rg: Tensor, beta: float, params: Sequence[Tensor],
                 gs: Sequence[Tensor]) -> None:
        self.rows, self.plan, self.u, self.rg, self.beta = rows, plan, u, rg, float(beta)
        self.params, self.gs = list(params), list(gs)
        square = squares([self.gs])[0]
        #: <d, g> over the block = beta |g|^2 + u^T (R g)
        self.product = self.beta * square + torch.dot(u.reshape(-1), rg.reshape(-1).to(u.dtype)).to(torch.float64)

    def finite(self) -> bool:
        return bool(torch.isfinite(self.u).all()) and bool(torch.isfinite(self.rg).all())

    def add_to(self, targets: Sequence[Tensor], scale: float, decay: float = 1.0) -> None:
        """targets[i] = decay * targets[i] + scale * d_i, in place: decay t + R^T (scale u) in R^T u's own
        product where the form allows (woodbury.Rows.jtu: the momentum decay rides on the product's beta,
        no pass of its own), else copied in; then scale beta g_i in one multi-tensor pass."""
        back = self.rows.jtu(self.plan, self.u * scale, targets, beta=decay, out=targets)
        for t, b in zip(targets, back):
            if b.data_ptr() != t.data_ptr():
                t.copy_(b.view(t.shape))
        torch._foreach_add_(list(targets), self.gs, alpha=scale * self.beta)


class Known:
    """<d, g> of whole blocks, known without reading d: for a Woodbury block d = beta g + R^T u (u the
    solve's scaled u', R g its right-hand side), so

        <d, g> = beta |g|^2 + u^T (R g)

    (a block with a prior: d = S d', g' = S g, and <d, g> = <d', g'> = beta |g'|^2 + u^T R' g'). ``at``:
    the position in the step's directions of each block's first parameter, where its product goes;
    ``covered``: every position of those blocks (the others' product is 0, as for ``Deferred``);
    ``squares`` [k] float64: each block's |g|^2 (``squares``); ``rg_u``: u^T R g per block (from
    batched.Solver.solve_with_products); ``betas``: 1 / damping per block.

    A few vector operations instead of one dot over d and g per parameter (ViT-tiny: 152 dots, 7 ms of
    a reuse step). The products have the precision of the formed path's: d itself is formed in the
    compute dtype with the same cancellation between beta g and R^T u. Finiteness (``check_finite``): a
    non-finite g, u or R g makes the product non-finite; d = beta g + R^T u is then finite unless
    R^T u overflows."""

    def __init__(self, at: list[int], covered: set[int], squares: Tensor, rg_u: Sequence[Tensor],
                 betas: Sequence[float]) -> None:
        self.at, self.covered = at, covered
        device = squares.device
        self.values = (squares * torch.tensor(list(betas), dtype=torch.float64, device=device)
                       + torch.stack([t.to(device) for t in rg_u]))


#: a gradient of at least this many elements has |g|^2 from its dot with itself, not the multi-tensor norm
LARGE = 1 << 16


def squares(gs: Sequence[Sequence[Tensor]], device=None) -> Tensor:
    """|g_b|^2 of each block b (``gs``: its gradients), float64 [len(gs)]. A large contiguous gradient's
    from its dot with itself (on the 4096 MLP's 16.8 M weight 2.2 ms against the norm's 4.2-6.6 ms, and
    closer to the float64 sum: 1.6e-4 against the squared norm's 1.3e-3), the others in one multi-tensor
    norm (one launch for many small tensors)."""
    flat = [g for block in gs for g in block]
    device = device if device is not None else (flat[0].device if flat else None)
    out = torch.zeros(len(gs), dtype=torch.float64, device=device)
    small, owner = [], []
    for b, block in enumerate(gs):
        for g in block:
            if g.numel() >= LARGE and g.is_contiguous():
                v = g.reshape(-1)
                out[b] += torch.dot(v, v).to(device=device, dtype=torch.float64)
            else:
                small.append(g)
                owner.append(b)
    if small:
        sq = torch.stack([n.to(device) for n in torch._foreach_norm(small)]).to(torch.float64).square()
        out.index_add_(0, torch.tensor(owner, device=device), sq)
    return out


def dots(directions: Sequence[Direction], known: Known | None = None) -> Tensor:
    """<d, g> of every direction, float64 [n]: one pass over each pair, shared by the finiteness check
    and the KL clip (``check_finite``, ``kl_scale``); ``known``: blocks whose products are already known
    (their positions are not read)."""
    if known is not None and known.at:
        rest = [i for i in range(len(directions)) if i not in known.covered]
        out = known.values.new_zeros(len(directions))
        out[torch.tensor(known.at, device=out.device)] = known.values
        if rest:
            out[torch.tensor(rest, device=out.device)] = dots([directions[i] for i in rest]).to(out.device)
        return out
    prods = []
    for p, d, g, _ in directions:
        if isinstance(d, Deferred):     # the block's <d, g> on its first parameter, 0 on the others
            prods.append(d.product if p is d.params[0] else d.product.new_zeros(()))
        else:
            prods.append(torch.dot(d.reshape(-1), g.reshape(-1)))
    if all(t.dtype == prods[0].dtype for t in prods):       # one conversion, not one per parameter
        return torch.stack(prods).to(torch.float64)
    return torch.stack([t.to(torch.float64) for t in prods])


def check_finite(directions: Sequence[Direction], labels: dict[int, str], products: Tensor | None = None) -> None:
    """Raise naming the first layer with a non-finite gradient, else the first non-finite direction
    (``labels``: id(param) -> "layer 'name'" or "parameter 'name'").

    Fast path: the products <d, g> (``dots``, or ``products`` already computed) and a single host sync: a
    non-finite entry of d or g makes its product non-finite (inf * 0 is nan). Only when a product is not
    finite (a non-finite entry, or a finite overflow of the sum) are the tensors searched element-wise;
    a product that merely overflowed raises nothing.
    """
    if not directions:
        return
    if products is None:
        products = dots(directions)
    if bool(torch.isfinite(products).all()):
        return
    for p, _, g, _ in directions:
        if not bool(torch.isfinite(g).all()):
            raise TENGraDError(f"{labels.get(id(p), 'a parameter')}: non-finite gradient")
    for p, d, _, _ in directions:
        if not (d.finite() if isinstance(d, Deferred) else bool(torch.isfinite(d).all())):
            raise TENGraDError(f"{labels.get(id(p), 'a parameter')}: the preconditioned direction "
                               "has non-finite entries")


def reference_lr(group: dict) -> float:
    """lr_ref = max(the group's lr_ref so far, its lr, its scheduler's ``initial_lr``) (module docstring)."""
    return max(group.get("kl_clip_lr", 0.0), group["lr"], group.get("initial_lr", 0.0))


def inner(directions: Sequence[Direction], products: Tensor | None = None) -> Tensor:
    """D = sum over parameters of lr_ref^2 <d, g> (float64 scalar tensor; lr_ref of each parameter's
    group, ``reference_lr``: the group's lr unless a schedule has lowered it); ``products``: the <d, g>
    already computed (``dots``)."""
    if products is None:
        products = dots(directions)
    lrs = torch.tensor([reference_lr(group) ** 2 for _, _, _, group in directions], dtype=torch.float64,
                       device=products.device)
    return (products * lrs).sum()


def kl_scale(directions: Sequence[Direction], kl_clip: float | None, ratio: float = 1.0,
             products: Tensor | None = None) -> float:
    """nu = min(1, r sqrt(kl_clip / D)) with D measured at the reference lrs and r = ``ratio`` in (0, 1]
    the gradient-noise ratio (noise.py: the bound becomes r^2 kl_clip); 1 when kl_clip is None or
    D <= 0."""
    if kl_clip is None or not directions:
        return 1.0
    dg = float(inner(directions, products))
    if not dg > 0:
        return 1.0
    return min(1.0, ratio * (kl_clip / dg) ** 0.5)


def apply(state: dict, directions: Sequence[Direction], nu: float = 1.0, heavy_ball: bool = True) -> None:
    """Momentum update of every parameter with multi-tensor (foreach) ops, group by group; ``state``
    is the optimizer's per-parameter state (``state[p]["momentum_buffer"]``). The directions are owned
    by the step and are scaled or kept as momentum buffers in place. ``heavy_ball`` False (step_rule="adam",
    whose d already preconditions the gradient's moving average): theta -= lr nu d, no buffer."""
    by_group: dict[int, tuple[dict, list, list]] = {}
    deferred: dict[int, tuple[Deferred, dict]] = {}
    for p, d, _, group in directions:
        if isinstance(d, Deferred):
            deferred.setdefault(id(d), (d, group))
            continue
        entry = by_group.setdefault(id(group), (group, [], []))
        entry[1].append(p)
        entry[2].append(d if d.dtype == p.dtype else d.to(p.dtype))
    for group, params, ds in by_group.values():
        group["kl_clip_lr"] = reference_lr(group)       # committed with the step (module docstring)
        momentum = group["momentum"] if heavy_ball else 0.0
        if not momentum:                # theta -= lr nu d: nu rides on the alpha, no pass of its own
            torch._foreach_add_(params, ds, alpha=-group["lr"] * nu)
            continue
        old, new, first = [], [], []
        for p, d in zip(params, ds):
            st = state[p]
            buf = st.get("momentum_buffer")
            if buf is None:                        # first step: buf = nu d (d is owned by this step,
                if scratch.is_kept(d):             # unless it lives in a kept buffer: curvature/scratch.py)
                    d = d.clone()
                st["momentum_buffer"] = d
                first.append(d)
            else:
                old.append(buf)
                new.append(d)
        if first and nu != 1.0:
            torch._foreach_mul_(first, nu)
        if old:                                    # buf = momentum buf + nu d
            torch._foreach_mul_(old, momentum)
            torch._foreach_add_(old, new, alpha=nu)
        torch._foreach_add_(params, [state[p]["momentum_buffer"] for p in params], alpha=-group["lr"])
    for d, group in deferred.values():               # nu d formed into the buffers (Deferred.add_to)
        group["kl_clip_lr"] = reference_lr(group)
        momentum = group["momentum"] if heavy_ball else 0.0
        if not momentum:                              # theta += -lr nu d
            d.add_to([p.detach() for p in d.params], -group["lr"] * nu)
            continue
        bufs, new = [], []
        for p in d.params:
            st = state[p]
            buf = st.get("momentum_buffer")
            new.append(buf is None)
            if buf is None:                           # first step: buf = nu d
                buf = st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            bufs.append(buf)
        if all(new) or not any(new):                  # buf = momentum buf + nu d, the decay in R^T u's product
            d.add_to(bufs, nu, 0.0 if all(new) else momentum)
        else:                                         # some buffers new (zeros), some kept: decay the kept
            torch._foreach_mul_([b for b, n in zip(bufs, new) if not n], momentum)
            d.add_to(bufs, nu)
        torch._foreach_add_([p.detach() for p in d.params], bufs, alpha=-group["lr"])
