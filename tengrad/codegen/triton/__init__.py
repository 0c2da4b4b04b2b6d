"""The triton backend: kernels generated from a term's spec and sizes (see ``render``), cached as
files (``cache``) and launched by ``TritonTermRun`` (``run``), a drop-in for the torch backend's
``TermRun``. Importing this package imports triton; ``tengrad`` itself never does unless asked."""
from .run import TritonTermRun

__all__ = ["TritonTermRun"]
