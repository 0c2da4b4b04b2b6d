"""The rules for TENGraD's hyperparameters, checked at construction and again at every ``step()``.

Per param group (a scheduler or the user may change them between steps through ``opt.param_groups``):

    lr            real, finite, >= 0      (0 is allowed: LambdaLR warm-ups start there)
    damping       real, finite, > 0       (the a of (F + a I)^-1)
    momentum      real, finite, in [0, 1)
    weight_decay  real, finite, >= 0

Per optimizer (attributes of ``opt``): ``update_freq`` an integer >= 1 (2.7 is refused, not
truncated), ``fisher`` one of fisher.FISHERS, ``kl_clip`` None or real, finite, > 0,
``max_jacobian_numel`` an integer >= 0, ``generator`` None or a ``torch.Generator``.
"Real" means an int or float (numpy scalars too) but not a bool and not a string or tensor.
Every error is a TENGraDError whose message names the argument (and the group index).
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from torch import nn

from tengrad.optim.errors import TENGraDError
from tengrad.optim.fisher import FISHERS

GROUP_KEYS = ("lr", "damping", "momentum", "weight_decay")

_RULES = {   # name: (test on a finite real, what the message says)
    "lr": (lambda v: v >= 0, "a finite number >= 0"),
    "damping": (lambda v: v > 0, "a finite number > 0"),
    "momentum": (lambda v: 0 <= v < 1, "a finite number in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, "a finite number >= 0"),
    "kl_clip": (lambda v: v > 0, "None or a finite number > 0"),
    "kl_clip_lr": (lambda v: v >= 0, "a finite number >= 0 (the KL clip's reference lr, stepctl.py)"),
}


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_value(name: str, value: object, where: str = "") -> float:
    """``value`` as a float if it obeys ``name``'s rule, else a TENGraDError naming ``where + name``."""
    test, rule = _RULES[name]
    label = f"{where}{name}" if not where else f"{where}[{name!r}]"
    if not _is_real(value):
        raise TENGraDError(f"{label} must be {rule}, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v) or not test(v):
        raise TENGraDError(f"{label} must be {rule}, got {value!r}")
    return v


def check_group(group: dict, index: int) -> None:
    """The four per-group hyperparameters of ``param_groups[index]``."""
    where = f"param_groups[{index}]"
    for key in GROUP_KEYS:
        if key not in group:
            raise TENGraDError(f"{where} has no {key!r} (a TENGraD group needs {list(GROUP_KEYS)})")
        check_value(key, group[key], where)
    if "kl_clip_lr" in group:        # the KL clip's reference lr (stepctl.py), e.g. from a loaded state_dict
        check_value("kl_clip_lr", group["kl_clip_lr"], where)


def check_update_freq(value: object) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool) or int(value) < 1:
        raise TENGraDError(f"update_freq must be an integer >= 1, got {value!r} ({type(value).__name__})")
    return int(value)


def check_options(fisher: object, update_freq: object, kl_clip: object, max_jacobian_numel: object,
                  generator: object) -> None:
    """The optimizer-wide options (construction and every step)."""
    if not isinstance(fisher, str) or fisher not in FISHERS:
        raise TENGraDError(f"unknown fisher {fisher!r}; valid: {list(FISHERS)}")
    check_update_freq(update_freq)
    if kl_clip is not None:
        check_value("kl_clip", kl_clip)
    if (not isinstance(max_jacobian_numel, Integral) or isinstance(max_jacobian_numel, bool)
            or int(max_jacobian_numel) < 0):
        raise TENGraDError(f"max_jacobian_numel must be an integer >= 0, got {max_jacobian_numel!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TENGraDError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def check_model(model: object) -> nn.Module:
    """TENGraD hooks the model's layers, so it takes the module itself, not its parameters."""
    if isinstance(model, nn.Module):
        return model
    raise TENGraDError(
        f"TENGraD needs the model (an nn.Module), got {type(model).__name__}: it hooks the layers to "
        "capture their inputs and output gradients. Call TENGraD(model, lr=..., damping=...), not "
        "TENGraD(model.parameters(), ...); for several groups pass "
        "param_groups=[{'params': [...], 'lr': ...}, ...] after the model")


def check_all(opt) -> None:
    """Everything, as it stands now (called at the top of every ``step()``)."""
    check_options(opt.fisher, opt.update_freq, opt.kl_clip, opt.max_jacobian_numel, opt.generator)
    for i, group in enumerate(opt.param_groups):
        check_group(group, i)
