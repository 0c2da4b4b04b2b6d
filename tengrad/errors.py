"""Errors of the PyTorch side; all derive from ``tengrad_ir.TengradError``."""
from tengrad_ir.errors import SpecError, TengradError


class UnsupportedLayerError(TengradError, TypeError):
    """A module type with no registered spec (the message lists the registered ones)."""


class ShapeError(TengradError, ValueError):
    """An input, output gradient, direction or weight vector of the wrong shape or dtype."""


__all__ = ["TengradError", "SpecError", "UnsupportedLayerError", "ShapeError"]
