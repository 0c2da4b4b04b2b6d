"""The bytes a block's kept curvature takes (the budget of ``TENGraD(..., curvature_memory=...)`` is
curvature/budget.py, which prices the forms before they are built).

A block keeps its rows R either as the explicit Jacobian J [r, P] (paths.py: fewer flops or seconds per
cycle for J g and J^T u) or as the layer's input and output gradients x [m, ...], gy [r, ...] (the
paper's reuse: O(m (d_in + d_out)) per layer). J is the larger form whenever P = d_in d_out exceeds
the per-sample sizes of x and gy, and on a model of many blocks the J's add up (ViT-tiny at batch 32:
678 MB against SGD's 140 MB of working memory, benchmarks/README.md). With a cap, the blocks that keep
J are moved to x and gy, the largest saving first, until the bytes kept by all blocks,

    sum_b (J_b bytes if explicit else x_b + gy_b bytes),

are within the cap or no block that would save bytes is left (a J smaller than its x and gy stays).
A moved block stays on x and gy (``Block.memory_reuse``)
at later curvature steps, so its J is never formed again (nor its gradient taken from J). The step is
the same exact step either way; only the cost of J g and J^T u on reuse steps changes.
"""
from __future__ import annotations

from tengrad.optim.curvature.woodbury import Rows


def _bytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def kept_bytes(r: Rows) -> int:
    """The bytes a block keeps between curvature steps in this form (J alone once K is formed)."""
    if r.explicit_held:
        return _bytes(r.jac) + sum(_bytes(p) for p in (r.pieces or ()))
    return _bytes(r.x) + _bytes(r.gy)
