"""The layer registry: a plain dict from module type to spec factory, failing loudly.

A spec factory takes the module and returns its ``Term``s (one per parameter; frozen parameters
are dropped later by ``tengrad.compile``). ``register_layer`` declares a user's own layer.
"""
from __future__ import annotations

from functools import wraps
from typing import Callable, Sequence

from torch import nn

from tengrad_ir import LayerSpec

from ..errors import TengradError, UnsupportedLayerError
from .term import Term

SpecFactory = Callable[[nn.Module], Sequence[Term]]
_REGISTRY: dict[type, SpecFactory] = {}


def register_layer(module_type: type, spec_factory: SpecFactory) -> SpecFactory:
    """Declare ``spec_factory(module) -> [Term, ...]`` for modules of ``module_type`` (and subclasses
    without a registration of their own whose ``forward`` is ``module_type``'s: ``factory_for``).
    Re-registering a type replaces its factory."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_layer: module_type must be an nn.Module subclass, got {module_type!r}")
    if not callable(spec_factory):
        raise TypeError(f"register_layer: spec_factory for {module_type.__name__} is not callable")
    _REGISTRY[module_type] = spec_factory
    return spec_factory


def registered_layers() -> tuple[type, ...]:
    return tuple(_REGISTRY)


def _checked(factory: SpecFactory) -> SpecFactory:
    """``factory`` whose output is checked: a list or tuple of ``Term`` with distinct string ``param``,
    a ``LayerSpec`` and a callable or None ``pre_map``. Anything else, and any exception of the factory
    that is not already a ``TengradError``, becomes a ``TengradError`` naming the module type."""

    @wraps(factory)
    def run(module: nn.Module) -> list[Term]:
        kind = type(module).__name__
        try:
            terms = factory(module)
        except TengradError:
            raise
        except Exception as exc:
            raise TengradError(f"the spec factory for {kind} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(terms, (list, tuple)):
            raise TengradError(f"the spec factory for {kind} returned {type(terms).__name__}; it must "
                               "return a list of tengrad.Term")
        seen = set()
        for k, t in enumerate(terms):
            if not isinstance(t, Term):
                raise TengradError(f"the spec factory for {kind} returned {type(t).__name__} at position "
                                   f"{k}; every item must be a tengrad.Term")
            if not isinstance(t.param, str) or not isinstance(t.spec, LayerSpec):
                raise TengradError(f"the spec factory for {kind}: Term {k} needs a parameter name (str) and "
                                   f"a LayerSpec, got {type(t.param).__name__} and {type(t.spec).__name__}")
            if t.pre_map is not None and not callable(t.pre_map):
                raise TengradError(f"the spec factory for {kind}: pre_map of term {t.param!r} is not callable")
            if t.param in seen:
                raise TengradError(f"the spec factory for {kind} returned two terms for {t.param!r}")
            seen.add(t.param)
        return list(terms)

    return run


def factory_for(module: nn.Module) -> SpecFactory:
    """The registered factory of ``module``'s type, or of its nearest registered base class when the
    type runs that base's own ``forward``; its output checked (``_checked``).

    A spec describes what a forward computes, so a subclass with a ``forward`` of its own (timm's
    ``BatchNormAct2d`` applies its activation inside it, ``LayerNorm2d`` permutes NCHW around
    ``F.layer_norm``, a user's ``Linear`` variant rescales its output) gets no module spec: it raises
    ``UnsupportedLayerError`` here, and the optimizer captures it at the ops its forward calls
    (capture/ops.py), unless its own type is registered."""
    kind = type(module)
    if getattr(module, "parametrizations", None) is not None and isinstance(module.parametrizations, nn.ModuleDict):
        names = ", ".join(module.parametrizations.keys())
        raise UnsupportedLayerError(
            f"no tengrad spec for {kind.__name__}: its {names} is parametrized (torch.nn.utils.parametrize: "
            "weight_norm, spectral_norm, ...), so the tensor its forward reads is computed from other "
            "parameters; they keep the damped identity, the rest of the model is unaffected")
    for cls in kind.__mro__:
        if cls in _REGISTRY:
            if cls is kind or getattr(kind, "forward", None) is getattr(cls, "forward", None):
                return _checked(_REGISTRY[cls])
            raise UnsupportedLayerError(
                f"no tengrad spec for module type {kind.__name__}: it subclasses {cls.__name__} but "
                f"defines its own forward, which {cls.__name__}'s spec does not describe; its ops are "
                f"captured instead (or declare it: tengrad.register_layer({kind.__name__}, spec_factory))")
    names = ", ".join(sorted(t.__name__ for t in _REGISTRY))
    raise UnsupportedLayerError(
        f"no tengrad spec for module type {type(module).__name__}; registered: {names}. "
        "Declare one with tengrad.register_layer(module_type, spec_factory).")
