"""The capture pass: what TENGraD records in the model's forward and backward (see model.py)."""
from tengrad.optim.capture.hooks import CURVATURE, GRADIENT, HookSet, OwnHook
from tengrad.optim.capture.model import ModelCapture
from tengrad.optim.capture.record import Use

__all__ = ["ModelCapture", "Use", "HookSet", "OwnHook", "GRADIENT", "CURVATURE"]
