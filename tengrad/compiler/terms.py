"""Term matching: a module's trainable parameters paired with the spec terms of its registered factory.

Every trainable parameter (``named_parameters(recurse=False)``, in that order) needs exactly one
term; frozen parameters are left out; a term naming no parameter is an error.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import TengradError
from ..layers import factory_for
from ..layers.term import Term


def match_terms(module: nn.Module, name: str) -> tuple[tuple[Term, ...], tuple[tuple[str, torch.Tensor], ...]]:
    """(terms, (param name, parameter) pairs) of the module's trainable parameters, in order."""
    terms = {t.param: t for t in factory_for(module)(module)}
    params = dict(module.named_parameters(recurse=False))
    unknown = [t for t in terms if t not in params]
    if unknown:
        raise TengradError(f"{name}: spec term {unknown[0]!r} names no parameter of the module")
    missing = [p for p, q in params.items() if q.requires_grad and p not in terms]
    if missing:
        raise TengradError(f"{name}: trainable parameter {missing[0]!r} has no spec term")
    chosen = tuple(terms[p] for p, q in params.items() if q.requires_grad and p in terms)
    if not chosen:
        raise TengradError(f"{name}: no trainable parameters to precondition")
    return chosen, tuple((t.param, params[t.param]) for t in chosen)
