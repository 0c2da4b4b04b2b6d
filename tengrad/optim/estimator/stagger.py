"""Staggered curvature (``TENGraD(..., stagger=True)``): each block refreshes on its own step of the cycle.

Without staggering (the default) steps 0, k, 2k, ... (``update_freq`` k) are curvature steps for every
block at once: that step captures every layer's input and output gradient and forms every Gram; the
k - 1 steps after it apply the kept curvature to their fresh gradient. With staggering, block ``b`` (its
index ``b.phase`` in ``opt.blocks``) refreshes on the steps t with

    (t - b.phase) mod k == 0,   and on any step where it holds no curvature yet

(step 0 for every block; after a promotion or a step that skipped it). The step itself is unchanged:
per block the exact Woodbury solve d_b = (F_b + a I)^-1 g_b with F_b from that block's last curvature
batch (at most k - 1 steps old, as without staggering) and g_b the fresh gradient. Only *when* the blocks
refresh differs, and with it the cost profile: a step captures and factors about n_blocks / k blocks
instead of all of them on every k-th step, so no step carries the whole capture
(docs/experiments/capture-overhead.md, the staggered columns) and step times stay even.

On a staggered step only the due blocks' captures run (capture/ops.py: their forward wrappers are
the only ones installed for the forward, capture/wrappers.py), and the op-level TorchFunctionMode /
MultiheadAttention's recording only when a due block had uses there at its last capture
(``Block.mode_used`` / ``mha_used``; a block not captured yet turns both on). A block whose forward
starts reading its parameters through a new op-level use after its first capture is therefore
seen on steps where another due block turns the mode on; ``check=True`` verifies every block on every
curvature step (curvature/consistency.py) and names such a block.

The gradient-noise ratio (noise.py) sums tr(K)/m and |g|^2 over the blocks of one curvature step;
under staggering ``CycleSums`` collects each block's pair at its own curvature step and hands the sums
to ``NoiseScale.update`` once every block holding curvature has contributed since the last update (one
update per cycle, as without staggering). A partial cycle is not saved in the state_dict: after a load
the next cycle starts afresh.

Staggering needs the empirical Fisher (the Monte-Carlo and exact Fisher run extra backward passes on
every curvature step, so staggered they would run on every step) and one process (the distributed step
decides curvature steps for all ranks together); both are refused at construction.
"""
from __future__ import annotations

from torch import Tensor


def due(steps: int, phase: int, update_freq: int, has_curvature: bool) -> bool:
    """Whether a block with ``phase`` refreshes its curvature at step ``steps``."""
    return not has_curvature or (steps - phase) % update_freq == 0


class CycleSums:
    """Per block (by name) its latest tr(K)/m and |g|^2 until every block of the cycle has one."""

    def __init__(self) -> None:
        self.pending: dict[str, tuple[Tensor, Tensor]] = {}
        self.m = 0

    def add(self, name: str, trace: Tensor, square: Tensor, m: int) -> None:
        self.pending[name] = (trace, square)
        self.m = m

    def take(self, names: list[str]) -> tuple[list[Tensor], list[Tensor], int] | None:
        """(traces, squares, m) over ``names`` once each has contributed (then the cycle restarts)."""
        if not names or any(n not in self.pending for n in names):
            return None
        traces = [self.pending[n][0] for n in names]
        squares = [self.pending[n][1] for n in names]
        self.pending = {}
        return traces, squares, self.m
