"""Per-layer choice between keeping x/gy ("reuse") and an explicit Jacobian ("jacobian").

Over one curvature cycle of k = update_freq steps, a block with r rows and P parameters costs

    reuse:     gram + k (jvp + vjp)                       memory ~ x and gy
    jacobian:  J + r^2 P + w 2 k r P                      memory r P  (J J^T, then mat-vecs)

where gram, jvp, vjp and J are the flops of the orders the layer's plan chooses for these sizes
(``layer.sized(x.shape, gy.shape).cost(quantity)``). The two mat-vecs of a step with the explicit J
(J g, J^T u) stream J from memory, 4 bytes per multiply-add, while the reuse path's products are
matrix-matrix, so a flop of a mat-vec with J costs more than a flop of the reuse path. For a J over
2^20 elements (out of cache) the mat-vecs' flops are weighted by w = ``MATVEC_WEIGHT`` = 14, chosen
from measurements in docs/experiments/step-cost.md; a J in cache keeps w = 1 (the gap is small there,
and on a curvature step its J also replaces autograd's weight gradient). The cheaper path wins, unless
r P exceeds ``max_jacobian_numel``. A cost model that fails is an error (``TENGraDError`` naming the
layer), never a silent fallback: a bug there would otherwise show only as a slowdown.

With a measured ``roofline`` (roofline.py: matmul rate F, memory bandwidth B) a J out of cache is
priced in seconds instead, counting the bytes each operation reads (s bytes per element):

    reuse:     (gram + k (jvp + vjp)) / F + 2 k s (|x| + |gy|) / B
    jacobian:  (J + r^2 P + 2 k r P) / F + (2 + 2 k) s r P / B       (write J, read it for K, 2 per step)

so the fixed weight w is replaced by what the machine measures (the optimizer passes it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from tengrad.errors import TengradError
from tengrad.optim.errors import TENGraDError

REUSE = "reuse"
JACOBIAN = "jacobian"
MATVEC_WEIGHT = 14   # mat-vecs with a J out of cache: chosen from measurements in docs/experiments/step-cost.md


@dataclass(frozen=True)
class PathChoice:
    path: str
    note: str   # one line for explain(): the costs compared


def priced(layer, x_shape, gy_shape, quantities: tuple[str, ...]) -> list[float]:
    """The flops of the orders ``layer``'s plan chooses for these sizes, one per quantity.
    ``layer``: a ``CompiledLayer`` (anything with ``sized(x_shape, gy_shape).cost(quantity)``)."""
    try:
        sized = layer.sized(tuple(x_shape), tuple(gy_shape))
        return [float(sized.cost(q).flops) for q in quantities]
    except TengradError:
        raise
    except Exception as err:   # re-raised naming the layer (a bug in the cost model is never silent)
        name = getattr(layer, "name", type(layer).__name__)
        raise TENGraDError(f"layer {name!r}: the cost model failed for x {tuple(x_shape)}, gy {tuple(gy_shape)}: "
                           f"{type(err).__name__}: {err}") from err


def choose(layer, x_shape, gy_shape, n_params: int, update_freq: int,
           max_jacobian_numel: int, roofline=None, itemsize: int = 4) -> PathChoice:
    """``layer``: a ``CompiledLayer`` (anything with ``sized(x_shape, gy_shape).cost(quantity)``);
    ``roofline``: a ``roofline.Roofline`` (seconds from flops and bytes for a J out of cache), or None
    (flops, the mat-vecs weighted by ``MATVEC_WEIGHT``); ``itemsize``: bytes per element of x, gy, J."""
    r = int(gy_shape[0])
    k = int(update_freq)
    gram, jvp, vjp, form = priced(layer, x_shape, gy_shape, ("gram", "jvp", "vjp", "jacobian"))
    rp = r * n_params
    if roofline is not None and rp > 2 ** 20:
        held = itemsize * (_numel(x_shape) + _numel(gy_shape))
        reuse = roofline.seconds(gram + k * (jvp + vjp), 2 * k * held)
        explicit = roofline.seconds(form + r * rp + 2 * k * rp, (2 + 2 * k) * itemsize * rp)
        costs = f"reuse {reuse * 1e3:.3g} vs jacobian {explicit * 1e3:.3g} ms per {k}-step cycle (roofline)"
    else:
        reuse = gram + k * (jvp + vjp)
        w = MATVEC_WEIGHT if rp > 2 ** 20 else 1
        explicit = form + r * rp + w * 2 * k * rp
        costs = f"reuse {reuse:.3g} vs jacobian {explicit:.3g} flops per {k}-step cycle"
    if rp > max_jacobian_numel:
        return PathChoice(REUSE, f"{costs}; jacobian {r}x{n_params} over the memory cap")
    return PathChoice(JACOBIAN if explicit < reuse else REUSE, costs)


class StepSeconds(NamedTuple):
    """One block's reuse step priced by the roofline (``step_seconds``): with its explicit J, with x
    and gy (None: no such form), and its layer's forward on the step's batch."""
    jacobian: float
    reuse: float | None
    forward: float


def matvec_seconds(rp: int, itemsize: int, roofline) -> float:
    """J g and J^T u with an explicit J of ``rp`` elements: 4 r P flops reading J twice."""
    return roofline.seconds(4 * rp, 2 * itemsize * rp)


def step_seconds(layer, x_shape, gy_shape, n_params: int, roofline, itemsize: int = 4,
                 samples: int | None = None) -> StepSeconds:
    """A reuse step's J g and J^T u for one block with r = gy_shape[0] rows in each form (x_shape: x
    repeated to those rows, as bound), and the forward of its m = ``samples`` samples (default r; the
    chosen J p order's flops at m rows: the layer's forward with weights p, or as many flops), in seconds
    (roofline.py)."""
    jvp, vjp = priced(layer, x_shape, gy_shape, ("jvp", "vjp"))
    r = int(gy_shape[0])
    m = r if samples is None else int(samples)
    reuse = roofline.seconds(jvp + vjp, 2 * itemsize * (_numel(x_shape) + _numel(gy_shape)))
    return StepSeconds(matvec_seconds(r * n_params, itemsize, roofline), reuse, roofline.seconds(jvp * m / r, 0))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
