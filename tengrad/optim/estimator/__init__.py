"""Estimators: when blocks refresh their curvature and the step's directions (see base.py)."""
from tengrad.optim.estimator.base import Direction, Estimator, StepInput
from tengrad.optim.estimator.distributed import resolve as resolve_distributed
from tengrad.optim.estimator.local import LocalEstimator

__all__ = ["Estimator", "StepInput", "Direction", "LocalEstimator", "resolve_distributed"]
