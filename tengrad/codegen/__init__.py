"""Backends that execute a plan: ``torch`` (the reference, any device) and ``triton`` (generated kernels)."""
