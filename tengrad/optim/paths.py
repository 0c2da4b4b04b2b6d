"""Per-layer choice between keeping x/gy ("reuse") and an explicit Jacobian ("jacobian").

Over one curvature cycle of k = update_freq steps, a block with r rows and P parameters costs

    reuse:     gram + k (jvp + vjp)                       memory ~ x and gy
    jacobian:  J + r^2 P + 2 k r P                        memory r P  (J J^T, then mat-vecs)

where gram, jvp, vjp are the flops of the orders the layer plan picks for these sizes
(``plan.sized(x.shape, gy.shape).cost(q, sized.choice[q])``) and J is ``cost("jacobian", ...)`` when the
plan prices it, else the vjp cost (forming the per-sample gradients is the vjp without the sum over
samples). The cheaper path wins, unless r P exceeds ``max_jacobian_numel``. Without a cost model
(a plan with no ``sized``, or any error from it) the layer keeps x/gy, the paper's reuse.
"""
from __future__ import annotations

from dataclasses import dataclass

REUSE = "reuse"
JACOBIAN = "jacobian"


@dataclass(frozen=True)
class PathChoice:
    path: str
    note: str   # one line for explain(): the costs compared, or why there was no comparison


def _flops(cost) -> float:
    return float(getattr(cost, "flops", cost))


def _priced(sized, quantity: str) -> float:
    choice = getattr(sized, "choice", {}) or {}
    order = choice.get(quantity)
    return _flops(sized.cost(quantity, order))


def choose(plan, x_shape, gy_shape, n_params: int, update_freq: int,
           max_jacobian_numel: int) -> PathChoice:
    r = int(gy_shape[0])
    k = int(update_freq)
    sized_fn = getattr(plan, "sized", None)
    if sized_fn is None:
        return PathChoice(REUSE, "no cost model (plan.sized missing): keep x/gy")
    try:
        sized = sized_fn(tuple(x_shape), tuple(gy_shape))
        gram, jvp, vjp = (_priced(sized, q) for q in ("gram", "jvp", "vjp"))
        try:
            form = _priced(sized, "jacobian")
        except Exception:
            form = vjp
    except Exception as err:  # a plan that cannot price these sizes still runs them
        return PathChoice(REUSE, f"no cost model ({type(err).__name__}): keep x/gy")
    reuse = gram + k * (jvp + vjp)
    explicit = form + r * r * n_params + 2 * k * r * n_params
    costs = f"reuse {reuse:.3g} vs jacobian {explicit:.3g} flops per {k}-step cycle"
    if r * n_params > max_jacobian_numel:
        return PathChoice(REUSE, f"{costs}; jacobian {r}x{n_params} over the memory cap")
    return PathChoice(JACOBIAN if explicit < reuse else REUSE, costs)
