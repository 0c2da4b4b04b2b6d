"""The optimizer's error type: a plain subclass of the project's one root, ``tengrad.TengradError``.

The hierarchy (``tengrad.errors``)::

    TengradError
      SpecError               a layer spec that contradicts itself
      ShapeError              tensors of the wrong shape or dtype
      UnsupportedLayerError   a module type with no registered spec
      TENGraDError            the optimizer: bad usage, non-finite values, failed factorisation

Messages name the offending layer or parameter.
"""
from __future__ import annotations

from tengrad.errors import TengradError


class TENGraDError(TengradError):
    """A TENGraD optimizer error (bad usage, non-finite values, failed factorisation)."""
