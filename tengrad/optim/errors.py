"""The optimizer's error type.

Every error raised by ``tengrad.optim`` is a :class:`TENGraDError`, which derives from the project's
domain error ``tengrad.TengradError`` when that is importable at the time this module is imported (the
package ``__init__`` should define or import it before it imports ``tengrad.optim``); otherwise it
falls back to ``RuntimeError`` so that this package also works on its own.
Messages name the offending layer or parameter.
"""
from __future__ import annotations


def _domain_base() -> type[Exception]:
    try:
        import tengrad
    except ImportError:  # pragma: no cover - tengrad is our own package
        return RuntimeError
    base = getattr(tengrad, "TengradError", None)
    if isinstance(base, type) and issubclass(base, Exception):
        return base
    return RuntimeError


class TENGraDError(_domain_base()):
    """A TENGraD optimizer error (bad usage, non-finite values, failed factorisation)."""
