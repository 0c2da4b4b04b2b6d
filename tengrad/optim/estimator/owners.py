"""What each block exchanges in the exact distributed step, and which rank owns its solve.

Global batch M = sum_r m_r over R ranks; a block with P parameters has r_r = reps * m_r Jacobian rows
on rank r (reps = 1, or C for the exact Fisher) and M_rows = reps * M in all. K = J J^T with J the
ranks' rows stacked, so its cross-rank blocks K_rs = J_r J_s^T need data from both ranks. Two forms
reach the owner of the block (distributed.py):

* "factors": the layer inputs x_r [m_r, ...] and output gradients gy_r [r_r, ...]; the owner runs
  the plan's Gram on the concatenated batch. Bytes per rank: m_max * |x_i| + r_max * |gy_i|.
* "rows":    the explicit per-sample Jacobian J_r [r_r, P]; the owner forms J J^T.
  Bytes per rank: r_max * P.

(m_max, r_max: the largest rank's sizes, as gloo's gather pads to equal sizes.) The form with fewer
bytes wins; "rows" also needs M_rows * P within ``max_jacobian_numel`` on the owner. Everything else
per step is form-independent: J_r g (r_r numbers) gathered to the owner, u = (K + M a I)^-1 J g
(M_rows numbers) broadcast from it, and sum_r J_r^T u_r (P numbers) all-reduced.

Owners are assigned by greedy longest-processing-time on the owner's work (Gram on M_rows rows from
the plan's cost model (paths.priced; a cost model that fails raises naming the layer), or M_rows^2 P for rows; plus M_rows^3 / 3 for the Cholesky): blocks sorted by
cost, each to the least loaded rank (ties to the lower rank), so ranks finish together. Every rank
computes the same assignment from the same all-gathered sizes; no message is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

from tengrad.optim.curvature.paths import priced

FACTORS = "factors"
ROWS = "rows"


@dataclass(frozen=True)
class Exchange:
    form: str          # FACTORS or ROWS
    bytes_factors: int  # per rank per curvature step, padded
    bytes_rows: int
    owner_flops: float  # the owner's Gram + Cholesky work on the global batch

    @property
    def bytes(self) -> int:
        return self.bytes_factors if self.form == FACTORS else self.bytes_rows


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def choose(plan, x_shape, gy_shape, x_itemsize: int, itemsize: int, reps: int, sizes: list[int],
           n_params: int, max_jacobian_numel: int) -> Exchange:
    """x_shape/gy_shape: this rank's shapes (per-sample dims are the same on every rank)."""
    m_max, total = max(sizes), sum(sizes)
    rows_max, rows = reps * m_max, reps * total
    x_i, gy_i = _numel(x_shape[1:]), _numel(gy_shape[1:])
    b_factors = m_max * x_i * x_itemsize + rows_max * gy_i * itemsize
    b_rows = rows_max * n_params * itemsize
    chol = rows ** 3 / 3.0
    gram = priced(plan, (rows, *x_shape[1:]), (rows, *gy_shape[1:]), ("gram",))[0]
    form = ROWS if b_rows < b_factors and rows * n_params <= max_jacobian_numel else FACTORS
    owner = (gram if form == FACTORS else float(rows * rows * n_params)) + chol
    return Exchange(form, b_factors, b_rows, owner)


def rows_only(reps: int, sizes: list[int], n_params: int, itemsize: int) -> Exchange:
    """The exchange of a block whose rows are held only as an explicit J (under a prior: R S^T,
    curvature/prior.py): "rows", bytes_factors 0 (no factors to send)."""
    rows = reps * sum(sizes)
    return Exchange(ROWS, 0, reps * max(sizes) * n_params * itemsize, float(rows * rows * n_params) + rows ** 3 / 3.0)


def assign_owners(costs: list[float], world_size: int, loads: list[float] | None = None) -> list[int]:
    """Greedy LPT: blocks by decreasing cost, each to the least loaded rank (ties: lower rank)."""
    loads = list(loads) if loads is not None else [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world_size), key=lambda q: (loads[q], q))
        owners[i] = r
        loads[r] += costs[i]
    return owners
