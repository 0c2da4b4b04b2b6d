"""Param groups of TENGraD: which lr, damping, momentum and weight decay each block uses.

``TENGraD(model, lr, damping, ..., param_groups=[{"params": [...], "lr": ..., ...}, ...])`` keeps the
model first (the optimizer hooks its layers) and takes torch-style group dicts after it:

* ``param_groups[i]`` becomes ``opt.param_groups[i]``, in the order given; a key it leaves out
  (of lr, damping, momentum, weight_decay) takes the keyword argument's value. Other keys are refused
  (a typo such as "weight_decy" would otherwise be ignored silently).
* Trainable parameters listed in no group form one more group, built from the keyword arguments and
  appended *last* (so ``opt.param_groups[i]`` is still the user's i-th group); without
  ``param_groups`` that default group is the only one.
* Frozen parameters (``requires_grad=False``) listed in a group are dropped from it: they are never
  updated. A parameter that is not the model's, or that is listed twice, is an error naming it.
* A Fisher block (one module's trainable parameters) takes its hyperparameters from its group; the
  parameters of one block must share a group, else the error names the block and the groups.
  Fallback parameters (d = g / a) use their own group.

Schedulers (StepLR, LambdaLR, OneCycleLR with momentum cycling, ...) write ``opt.param_groups[i]``;
``step()`` reads every value from there at each step (and validates it, hyperparams.py).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from tengrad.optim.errors import TENGraDError
from tengrad.optim.hyperparams import GROUP_KEYS, check_value


def _param_list(params: object, where: str) -> list:
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, (str, bytes, dict, nn.Module)) or not isinstance(params, Iterable):
        raise TENGraDError(f"{where}['params'] must be an iterable of the model's parameters, got "
                           f"{type(params).__name__}" + (" (pass module.parameters())"
                                                         if isinstance(params, nn.Module) else ""))
    return list(params)


def build(model: nn.Module, param_groups: object) -> list[dict]:
    """torch-style group dicts (missing hyperparameters are filled from the defaults by torch)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if param_groups is None:
        return [{"params": trainable}]
    if isinstance(param_groups, dict) or not isinstance(param_groups, (list, tuple)):
        raise TENGraDError(f"param_groups must be a list of dicts like [{{'params': [...], 'lr': ...}}], "
                           f"got {type(param_groups).__name__}")
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    claimed: dict[int, int] = {}
    groups = []
    for i, spec in enumerate(param_groups):
        where = f"param_groups[{i}]"
        if not isinstance(spec, dict):
            raise TENGraDError(f"{where} must be a dict with 'params', got {type(spec).__name__}")
        if "params" not in spec:
            raise TENGraDError(f"{where} has no 'params'")
        unknown = [k for k in spec if k != "params" and k not in GROUP_KEYS]
        if unknown:
            raise TENGraDError(f"{where} has unknown key {unknown[0]!r}; valid: ['params', "
                               + ", ".join(repr(k) for k in GROUP_KEYS) + "]")
        kept = []
        for k, p in enumerate(_param_list(spec["params"], where)):
            if not isinstance(p, torch.Tensor) or id(p) not in names:
                raise TENGraDError(f"{where}['params'][{k}] is not a parameter of the model "
                                   f"({type(p).__name__}{tuple(p.shape) if isinstance(p, torch.Tensor) else ''})")
            if id(p) in claimed:
                raise TENGraDError(f"parameter {names[id(p)]!r} is listed in param_groups[{claimed[id(p)]}] "
                                   f"and in {where}")
            claimed[id(p)] = i
            if p.requires_grad:
                kept.append(p)
        hyper = {k: spec[k] for k in GROUP_KEYS if k in spec}
        for k, v in hyper.items():
            check_value(k, v, where)
        groups.append({"params": kept, **hyper})
    rest = [p for p in trainable if id(p) not in claimed]
    if rest:
        groups.append({"params": rest})
    return groups


def index_of(param_groups: list[dict]) -> dict[int, int]:
    """``{id(param): group index}``."""
    return {id(p): i for i, g in enumerate(param_groups) for p in g["params"]}


def group_of_block(name: str, param_names: list[str], params: list, where: dict[int, int]) -> int:
    """The one group index of a block's parameters; an error naming the block if they straddle groups."""
    found = [where.get(id(p)) for p in params]
    if len(set(found)) == 1 and found[0] is not None:
        return found[0]
    detail = ", ".join(f"{n} in {'no group' if g is None else f'param_groups[{g}]'}"
                       for n, g in zip(param_names, found))
    raise TENGraDError(f"block {name!r} straddles param groups ({detail}): the parameters of one layer "
                       "form one Fisher block and must share a group (lr, damping, momentum, weight decay)")
