"""Per-layer choice between keeping x/gy ("reuse") and an explicit Jacobian ("jacobian").

Over one curvature cycle of k = update_freq steps, a block with r rows and P parameters costs

    reuse:     gram + k (jvp + vjp)                       memory ~ x and gy
    jacobian:  J + r^2 P + 2 k r P                        memory r P  (J J^T, then mat-vecs)

where gram, jvp, vjp and J are the flops of the orders the layer's plan chooses for these sizes
(``layer.sized(x.shape, gy.shape).cost(quantity)``). The cheaper path wins, unless r P exceeds
``max_jacobian_numel``. A cost model that fails is an error (``TENGraDError`` naming the layer), never
a silent fallback: a bug there would otherwise show only as a slowdown.
"""
from __future__ import annotations

from dataclasses import dataclass

from tengrad.errors import TengradError
from tengrad.optim.errors import TENGraDError

REUSE = "reuse"
JACOBIAN = "jacobian"


@dataclass(frozen=True)
class PathChoice:
    path: str
    note: str   # one line for explain(): the costs compared


def choose(layer, x_shape, gy_shape, n_params: int, update_freq: int,
           max_jacobian_numel: int) -> PathChoice:
    """``layer``: a ``CompiledLayer`` (anything with ``sized(x_shape, gy_shape).cost(quantity)``)."""
    r = int(gy_shape[0])
    k = int(update_freq)
    try:
        sized = layer.sized(tuple(x_shape), tuple(gy_shape))
        gram, jvp, vjp, form = (float(sized.cost(q).flops) for q in ("gram", "jvp", "vjp", "jacobian"))
    except TengradError:
        raise
    except Exception as err:
        name = getattr(layer, "name", type(layer).__name__)
        raise TENGraDError(f"layer {name!r}: the cost model failed for x {tuple(x_shape)}, gy {tuple(gy_shape)}: "
                           f"{type(err).__name__}: {err}") from err
    reuse = gram + k * (jvp + vjp)
    explicit = form + r * r * n_params + 2 * k * r * n_params
    costs = f"reuse {reuse:.3g} vs jacobian {explicit:.3g} flops per {k}-step cycle"
    if r * n_params > max_jacobian_numel:
        return PathChoice(REUSE, f"{costs}; jacobian {r}x{n_params} over the memory cap")
    return PathChoice(JACOBIAN if explicit < reuse else REUSE, costs)
