"""The one error hierarchy; every error tengrad raises is a ``TengradError`` (defined in the IR so
that it stays torch-free)::

    TengradError
      SpecError               a layer spec that contradicts itself        (tengrad_ir)
      ShapeError              tensors of the wrong shape or dtype
      UnsupportedLayerError   a module type with no registered spec
      TENGraDError            the optimizer's errors                       (tengrad.optim.errors)
"""
from tengrad_ir.errors import SpecError, TengradError


class UnsupportedLayerError(TengradError, TypeError):
    """A module type with no registered spec (the message lists the registered ones)."""


class ShapeError(TengradError, ValueError):
    """An input, output gradient, direction or weight vector of the wrong shape or dtype."""


__all__ = ["TengradError", "SpecError", "UnsupportedLayerError", "ShapeError"]
