"""A cap on the curvature a step keeps (``TENGraD(..., curvature_memory=bytes)``).

A block keeps its rows R either as the explicit Jacobian J [r, P] (paths.py: fewer flops or seconds per
cycle for J g and J^T u) or as the layer's input and output gradients x [m, ...], gy [r, ...] (the
paper's reuse: O(m (d_in + d_out)) per layer). J is the larger form whenever P = d_in d_out exceeds
the per-sample sizes of x and gy, and on a model of many blocks the J's add up (ViT-tiny at batch 32:
678 MB against SGD's 140 MB of working memory, benchmarks/README.md). With a cap, the blocks that keep
J are moved to x and gy, the largest saving first, until the bytes kept by all blocks,

    sum_b (J_b bytes if explicit else x_b + gy_b bytes),

are within the cap or no block that would save bytes is left (a J smaller than its x and gy stays). A moved block stays on x and gy (``Block.memory_reuse``)
at later curvature steps, so its J is never formed again (nor its gradient taken from J). The step is
the same exact step either way; only the cost of J g and J^T u on reuse steps changes.
"""
from __future__ import annotations

from typing import Callable

from tengrad.optim.curvature.woodbury import Rows


def _bytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def kept_bytes(r: Rows) -> int:
    """The bytes a block keeps between curvature steps in this form (J alone once K is formed)."""
    if r.explicit_held:
        return _bytes(r.jac) + sum(_bytes(p) for p in (r.pieces or ()))
    return _bytes(r.x) + _bytes(r.gy)


def fit(rows: dict[int, Rows], cap: int, as_reuse: Callable[[int], Rows | None]) -> tuple[dict[int, Rows], list[int]]:
    """(``rows`` with explicit blocks moved to x and gy, the moved blocks): ``as_reuse(i)`` gives block
    i's rows as x and gy (None when it has none, e.g. a J summed over several uses); blocks are moved
    in the order of the bytes they save, only those that save any, until the kept bytes are <= cap."""
    total = sum(kept_bytes(r) for r in rows.values())
    if total <= cap:
        return rows, []
    options = []
    for i, r in rows.items():
        if r.explicit_held:
            moved = as_reuse(i)
            if moved is not None and kept_bytes(moved) < kept_bytes(r):
                options.append((kept_bytes(r) - kept_bytes(moved), i, moved))
    out, taken = dict(rows), []
    for saving, i, moved in sorted(options, key=lambda t: -t[0]):
        if total <= cap:
            break
        out[i], total = moved, total - saving
        taken.append(i)
    return out, taken
