"""The layer registry: a plain dict from module type to spec factory, failing loudly.

A spec factory takes the module and returns its ``Term``s (one per parameter; frozen parameters
are dropped later by ``tengrad.compile``). ``register_layer`` declares a user's own layer.
"""
from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from ..errors import UnsupportedLayerError
from .term import Term

SpecFactory = Callable[[nn.Module], Sequence[Term]]
_REGISTRY: dict[type, SpecFactory] = {}


def register_layer(module_type: type, spec_factory: SpecFactory) -> SpecFactory:
    """Declare ``spec_factory(module) -> [Term, ...]`` for modules of ``module_type`` (and subclasses
    without a registration of their own). Re-registering a type replaces its factory."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_layer: module_type must be an nn.Module subclass, got {module_type!r}")
    if not callable(spec_factory):
        raise TypeError(f"register_layer: spec_factory for {module_type.__name__} is not callable")
    _REGISTRY[module_type] = spec_factory
    return spec_factory


def registered_layers() -> tuple[type, ...]:
    return tuple(_REGISTRY)


def factory_for(module: nn.Module) -> SpecFactory:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    names = ", ".join(sorted(t.__name__ for t in _REGISTRY))
    raise UnsupportedLayerError(
        f"no tengrad spec for module type {type(module).__name__}; registered: {names}. "
        "Declare one with tengrad.register_layer(module_type, spec_factory).")
