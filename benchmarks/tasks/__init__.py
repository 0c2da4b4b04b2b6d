"""The tasks of ``benchmarks/tta.py``: ``3c1f``, ``resnet`` and ``lm``, each a ``Task`` (tasks/base.py).

``get(name)`` builds one; an unknown name raises with the list of valid ones.
"""
from __future__ import annotations

import inspect

from .base import Task

NAMES = ("3c1f", "resnet", "lm")


def get(name: str, quick: bool = False, **settings) -> Task:
    """The task ``name`` at its full-run settings (``settings`` override keyword arguments of its
    ``task()``), or its smoke settings with ``quick``."""
    if name == "3c1f":
        from .fmnist_3c1f import task
    elif name == "resnet":
        from .fmnist_resnet import task
    elif name == "lm":
        from .stdlib_lm import task
    else:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(NAMES)}")
    known = set(inspect.signature(task).parameters) - {"quick"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"task {name!r} takes no setting {', '.join(unknown)}; its settings: {', '.join(sorted(known))}")
    return task(quick, **settings)
