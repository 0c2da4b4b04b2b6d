"""Loss conventions: which Fisher a reduction and ignored labels give (``opt.backward``).

The capture turns a layer's output gradient into rows r_i = m dL/dy_i (m the batch) and
F = (1/m) sum_i r_i r_i^T: the empirical Fisher of a mean loss L = (1/m) sum_i l_i. When
``opt.backward(out, y, loss, ignore_index=..., reduction=...)`` knows the labels, the Fisher follows the
loss as written instead (g = param.grad, the gradient of that loss, in both):

* ``reduction="mean"`` with ignored labels (``cross_entropy``'s ``ignore_index``; a sample counts when
  any of its labels is not ignored, m_eff of them): L = (1/m_eff) sum_{i counted} l_i, and

      F = (1/m_eff) sum_{i counted} t_i t_i^T,   t_i = m_eff dL/dtheta|_i   (the mean over counted samples)

  The captured rows are r_i = (m / m_eff) t_i (zero for an ignored sample), so F = (m_eff / m) R^T R / m:
  the rows are scaled by f = sqrt(m_eff / m).
* ``reduction="sum"``: L = sum_i l_i and F = sum_i t_i t_i^T with t_i = dL/dtheta|_i (the Fisher of the
  summed negative log-likelihood; the step is (F + a I)^-1 g with g the summed gradient). The captured
  rows are r_i = m t_i, so f = 1 / sqrt(m).

A plain ``loss.backward()`` cannot tell these apart from a mean loss: with reduction "sum" its Fisher
is m^2 times the mean loss's and d = (1/m) (F_mean + (a / m^2) I)^-1 g_mean; with ignored samples it is
(m / m_eff) F_eff and d = (m_eff / m) (F_eff + (a m_eff / m) I)^-1 g (README "Losses and conventions").
"""
from __future__ import annotations

import math

from torch import Tensor

from tengrad.optim.errors import TENGraDError

REDUCTIONS = ("mean", "sum")


def counted_samples(y: Tensor, m: int, ignore_index: int | None) -> int:
    """How many of the m samples have a label that is not ``ignore_index`` (labels [m, ...])."""
    if ignore_index is None or y.is_floating_point() or y.dim() == 0 or y.shape[0] != m:
        return m
    return int((y != ignore_index).reshape(m, -1).any(1).sum())


def row_factor(m: int, counted: int, reduction: str) -> float:
    """f with F = f^2 R^T R / m the Fisher of the loss as written (module docstring)."""
    if reduction not in REDUCTIONS:
        raise TENGraDError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if counted == 0:
        raise TENGraDError(f"every one of the {m} samples has only ignored labels: no loss, no curvature")
    return math.sqrt(counted / m) if reduction == "mean" else 1.0 / math.sqrt(m)
