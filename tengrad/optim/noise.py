"""The gradient-noise scale of the step: a trust region that shrinks as the batch gradient turns to noise.

McCandlish et al. (2018, "An empirical model of large-batch training"): for a batch of m samples with
per-sample gradients j_i (mean g, true gradient G, per-sample covariance Sigma), E|g|^2 = |G|^2 +
tr(Sigma) / m, and the best step along g is the noiseless one times

    s = |G|^2 / (|G|^2 + tr(Sigma) / m) = |G|^2 / E|g|^2          (in (0, 1]).

TENGraD's empirical-Fisher curvature step has the rows j_i already: K = R R^T with R's rows the
per-sample gradients of a block (curvature/fisher.py), so T = tr(K) / m = (1/m) sum_i |j_i|^2 and
Q = |R^T 1 / m|^2 = 1^T K 1 / m^2 (= |g|^2, weight decay not included) cost two sums over the m x m
Gram per block. At each curvature step, summed over the blocks (parameters in no block are left out):

    S = m / (m - 1) * max(T - Q, 0)       (unbiased tr(Sigma))
    S_avg <- beta S_avg + (1 - beta) S,   Q_avg <- beta Q_avg + (1 - beta) Q     (beta 0.8 per curvature step;
                                                                                 the first step sets them)
    s = clamp((Q_avg - S_avg / m) / Q_avg, FLOOR, 1)      (|G|^2 = Q - S / m unbiased; FLOOR 0.05)
    r = s / max(s over the curvature steps so far)        (in [FLOOR, 1])

By McCandlish et al.'s model the best step at time t is the noiseless one times s(t), so r(t) is how
much shorter the best step has become since the best moment so far. The KL clip (update.py) then
bounds the step by r^2 kl_clip instead of kl_clip: nu = min(1, r sqrt(kl_clip / D)). So kl_clip is
the trust region while the gradient is at its most informative, a clipped step shrinks with r, a step
inside the shrunken bound is exact, and ``kl_clip=None`` (the exact step) ignores r. The ratio, not s
itself, because s depends on the batch size and the model (one model's s can sit at the floor from
the first step while another's starts well above it), while r starts at 1 for every model. As the
batch gradient turns to noise later in training s falls, so the trust region shrinks as a
learning-rate decay would, without a horizon (the values of s on 3C1F and on a BatchNorm ResNet:
docs/experiments/time-to-accuracy.md). r is computed after the step that uses the previous one (a
step never uses its own batch's estimate) and is saved in the state_dict.

Only the empirical Fisher's rows are per-sample loss gradients, so with fisher "mc" or "exact" r stays 1,
and under torch.distributed it stays 1 as well (each rank holds only its own rows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

BETA = 0.8
FLOOR = 0.05


@dataclass
class NoiseScale:
    """The running estimate; ``ratio`` is the factor r the next step uses (1 until the second curvature
    step)."""

    noise: float | None = None      # S_avg: running tr(Sigma)
    square: float | None = None     # Q_avg: running |g|^2
    s: float = 1.0                  # the signal share |G|^2 / E|g|^2
    peak: float | None = None       # the largest s so far

    @property
    def ratio(self) -> float:
        return 1.0 if self.peak is None else self.s / self.peak

    def update(self, traces: list[Tensor], squares: list[Tensor], m: int) -> None:
        """One curvature step: ``traces`` tr(K) / m and ``squares`` |g|^2 of each block (float64
        scalars), ``m`` the batch size (> 1)."""
        if not traces or m < 2:
            return
        both = torch.stack([torch.stack(traces).sum(), torch.stack(squares).sum()]).tolist()
        t, q = both
        if not (math.isfinite(t) and math.isfinite(q)) or q <= 0:
            return
        noise = m / (m - 1) * max(t - q, 0.0)
        if self.noise is None:
            self.noise, self.square = noise, q
        else:
            self.noise = BETA * self.noise + (1 - BETA) * noise
            self.square = BETA * self.square + (1 - BETA) * q
        self.s = min(1.0, max(FLOOR, (self.square - self.noise / m) / self.square))
        self.peak = self.s if self.peak is None else max(self.peak, self.s)

    def state(self) -> dict:
        return {"noise": self.noise, "square": self.square, "s": self.s, "peak": self.peak}

    @staticmethod
    def check(state: object) -> str | None:
        """None if ``state`` is what ``state()`` writes, else what is wrong with it."""
        if not isinstance(state, dict) or set(state) != {"noise", "square", "s", "peak"}:
            return f"must be a dict with keys ['noise', 'square', 's', 'peak'], got {state!r}"
        for key in ("noise", "square", "peak"):
            v = state[key]
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                      and math.isfinite(v) and v >= 0):
                return f"{key!r} must be None or a finite number >= 0, got {v!r}"
        s = state["s"]
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and FLOOR <= s <= 1):
            return f"'s' must be a number in [{FLOOR}, 1], got {s!r}"
        if state["peak"] is not None and state["peak"] < s:
            return f"'peak' ({state['peak']!r}) must be None or >= 's' ({s!r})"
        return None

    def load(self, state: dict) -> None:
        self.noise, self.square, self.s, self.peak = state["noise"], state["square"], float(state["s"]), state["peak"]
