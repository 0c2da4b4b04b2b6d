"""TENGraD's options: defaults, the rules for every hyperparameter (checked at construction and again at
every ``step()``), param groups and batch-dimension declarations.

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

Defaults (``TENGraD(model)``, ``resolve_rule``): prior "soap", step_rule "adam", lr 3e-3, damping 0.1,
momentum 0.95, update_freq 10, no KL clip (benchmarks/tta.py on 3C1F, a ResNet and a Transformer LM). The
paper's step (``prior=None``): lr 0.3, damping 1, momentum 0.9, kl_clip 6.4e-3 with the noise ratio,
chosen with benchmarks/robustness.py and benchmarks/tta.py (the runs: docs/experiments/robustness.md
and docs/experiments/time-to-accuracy.md).

Param groups: which lr, damping, momentum and weight decay each block uses.

``TENGraD(model, lr, damping, ..., param_groups=[{"params": [...], "lr": ..., ...}, ...])`` keeps the
model first (the optimizer hooks its layers) and takes torch-style group dicts after it:

* ``param_groups[i]`` becomes ``opt.param_groups[i]``, in the order given; a key it leaves out
  (of lr, damping, momentum, weight_decay) takes the keyword argument's value. Other keys are refused
  (a typo such as "weight_decy" would otherwise be ignored silently).
* Trainable parameters listed in no group form one more group, built from the keyword arguments and
  appended *last* (so ``opt.param_groups[i]`` is still the user's i-th group); without
  ``param_groups`` that default group is the only one.
* Frozen parameters (``requires_grad=False``) stay in their group, as in torch.optim: ``requires_grad``
  is read at every step, so a frozen parameter never moves and one unfrozen later trains from then on.
  A parameter that is not the model's, or that is listed twice, is an error naming it.
* A Fisher block (one module's trainable parameters) takes its hyperparameters from its group; the
  parameters of one block must share a group, else the error names the block and the groups.
  Fallback parameters (d = g / a) use their own group.

Schedulers (StepLR, LambdaLR, OneCycleLR with momentum cycling, ...) write ``opt.param_groups[i]``;
``step()`` reads every value from there at each step (and validates it, options.py).

Batch dimensions (``batch_dim``): an int, the dim of the model's input holding the batch, or a dict
``{"": that dim, layer name: the dim of that layer's input}`` (``batch_dims``).
"""
from __future__ import annotations

import math
import sys
from numbers import Integral, Real
from typing import Iterable

import torch
from torch import nn

from tengrad.optim.curvature.fisher import FISHERS
from tengrad.optim.curvature import prior as prior_mod
from tengrad.optim.errors import TENGraDError

DEFAULT_LR = 0.3
DEFAULT_DAMPING = 1.0
DEFAULT_UPDATE_FREQ = 10
DEFAULT_KL_CLIP = 6.4e-3      # with the noise ratio (noise.py)

GROUP_KEYS = ("lr", "damping", "momentum", "weight_decay")

_RULES = {   # name: (test on a finite real, what the message says)
    "lr": (lambda v: v >= 0, "a finite number >= 0"),
    "damping": (lambda v: v > 0, "a finite number > 0"),
    "momentum": (lambda v: 0 <= v < 1, "a finite number in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, "a finite number >= 0"),
    "kl_clip": (lambda v: v > 0, "None or a finite number > 0"),
    "kl_clip_lr": (lambda v: v >= 0, "a finite number >= 0 (the KL clip's reference lr, update.py)"),
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
    if "kl_clip_lr" in group:        # the KL clip's reference lr (update.py), e.g. from a loaded state_dict
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


def _optional_int(name: str, value: object, minimum: int, what: str) -> int | None:
    """None, or ``value`` as an int >= ``minimum`` (bools refused), else a TENGraDError naming ``name``."""
    if value is None:
        return None
    if not isinstance(value, Integral) or isinstance(value, bool) or int(value) < minimum:
        raise TENGraDError(f"{name} must be None or {what} >= {minimum}, got {value!r} ({type(value).__name__})")
    return int(value)


def check_curvature_batch(value: object) -> int | str | None:
    """"auto" (every row, fewer when the memory budget needs it: curvature/budget.py), None (every row
    of the batch) or an integer >= 1: the rows sampled per curvature step."""
    if value == "auto" and isinstance(value, str):
        return value
    try:
        return _optional_int("curvature_batch", value, 1, "an integer")
    except TENGraDError as err:
        raise TENGraDError(str(err).replace(">= 1,", ">= 1 or 'auto',")) from None


def check_curvature_memory(value: object) -> int | str | None:
    """"auto" (half the model's training memory, curvature/budget.py), None (no cap) or an integer >= 0:
    the bytes of curvature kept between steps."""
    if value == "auto" and isinstance(value, str):
        return value
    try:
        return _optional_int("curvature_memory", value, 0, "a number of bytes")
    except TENGraDError as err:
        raise TENGraDError(str(err).replace(">= 0,", ">= 0 or 'auto',")) from None


def check_token_rows(value: object, fisher: str, distributed: bool) -> int | None:
    """None or an integer >= 1: the positions sampled per curvature step (curvature/tokens.py)."""
    c = _optional_int("token_rows", value, 1, "an integer")
    if c is not None and fisher == "exact":
        raise TENGraDError("token_rows needs fisher 'empirical' or 'mc': the exact Fisher has C rows per sample, "
                           "one per output unit, which per position would be C m T rows")
    if c is not None and distributed:
        raise TENGraDError("token_rows is single-process only: the distributed step's rows are the ranks' whole "
                           "batches (estimator/distributed.py)")
    return c


#: the defaults of step_rule="adam" (``TENGraD(model)``): SOAP's lr, beta1 and a damping that weighs the rows
#: at a / mean sqrt(v) (docs/experiments/lm-prior-soap.md; benchmarks/README.md, tta.py)
RULE_LR, RULE_DAMPING, RULE_MOMENTUM = 3e-3, 0.1, 0.95
NATURAL_MOMENTUM = 0.9


def resolve_rule(prior: object, rule: object, kl_clip: object, lr: object, damping: object,
                 momentum: object) -> tuple[object, object, object, object, object]:
    """(step_rule, kl_clip, lr, damping, momentum) with the "auto" / None defaults filled in.

    step_rule "auto": "adam" when prior="soap" and no KL clip is asked (kl_clip "auto" or None), else
    "natural". kl_clip "auto": None under "adam" (the rule sets each coordinate's step at lr), else
    DEFAULT_KL_CLIP (with the noise ratio). lr, damping, momentum None: RULE_* under "adam", else
    DEFAULT_LR, DEFAULT_DAMPING, NATURAL_MOMENTUM (the paper's step's tuned defaults). Given values stay."""
    if rule not in ("auto", "natural", "adam"):
        raise TENGraDError(f"step_rule must be 'auto', 'natural' or 'adam', got {rule!r}")
    if rule == "auto":
        rule = "adam" if prior == "soap" and (kl_clip is None or kl_clip == "auto") else "natural"
    adam = rule == "adam"
    if isinstance(kl_clip, str) and kl_clip == "auto":
        kl_clip = None if adam else DEFAULT_KL_CLIP
    lr = (RULE_LR if adam else DEFAULT_LR) if lr is None else lr
    damping = (RULE_DAMPING if adam else DEFAULT_DAMPING) if damping is None else damping
    momentum = (RULE_MOMENTUM if adam else NATURAL_MOMENTUM) if momentum is None else momentum
    return rule, kl_clip, lr, damping, momentum


def check_step_rule(rule: object, prior: str | None, kl_clip: object) -> str:
    """"natural" (the KL-clipped natural-gradient step with heavy-ball momentum) or "adam" (SOAP's rule
    around the rows: curvature/prior.py's ``adam_scale``), which needs prior="soap" and kl_clip=None."""
    if rule not in ("natural", "adam"):
        raise TENGraDError(f"step_rule must be 'natural' or 'adam', got {rule!r}")
    if rule == "adam" and prior != "soap":
        raise TENGraDError(f"step_rule='adam' needs prior='soap' (SOAP's step around the rows), got prior={prior!r}")
    if rule == "adam" and kl_clip is not None:
        raise TENGraDError(f"step_rule='adam' sets each coordinate's step at lr as SOAP does; pass kl_clip=None "
                           f"(got kl_clip={kl_clip!r})")
    return rule


def check_prior(prior: object, beta: object, floor: object) -> tuple[str | None, float, float]:
    """prior None, "adam" (curvature/prior.py) or "soap" (curvature/eigenbasis.py); beta in [0, 1) (None:
    the prior's default, prior.default_beta); floor in (0, 1]."""
    if prior not in (None, "adam", "soap"):
        raise TENGraDError(f"prior must be None, 'adam' or 'soap', got {prior!r}")
    if beta is None:
        beta = prior_mod.default_beta(prior)
    for name, value, ok, what in (("prior_beta", beta, lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
                                  ("prior_floor", floor, lambda v: 0.0 < v <= 1.0, "in (0, 1]")):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok(float(value)):
            raise TENGraDError(f"{name} must be a number {what}, got {value!r}")
    return prior, float(beta), float(floor)


def check_model(model: object) -> nn.Module:
    """TENGraD hooks the model's layers, so it takes the module itself, not its parameters; a
    ``torch.compile``-d model is refused with the pattern that works (the hooks and per-forward
    wrappers would be traced into, or broken by, dynamo's graph)."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
        raise TENGraDError(
            "TENGraD(torch.compile(model)) is not supported: TENGraD hooks the plain model's layers. "
            "Build the optimizer on the plain model, then compile: opt = TENGraD(model, ...); "
            "compiled = torch.compile(model); train with compiled(x) and opt.step() "
            "(for a compiled model m, TENGraD(m._orig_mod, ...))")
    if isinstance(model, nn.Module):
        return model
    raise TENGraDError(
        f"TENGraD needs the model (an nn.Module), got {type(model).__name__}: it hooks the layers to "
        "capture their inputs and output gradients. Call TENGraD(model, lr=..., damping=...), not "
        "TENGraD(model.parameters(), ...); for several groups pass "
        "param_groups=[{'params': [...], 'lr': ...}, ...] after the model")


def check_all(fisher: object, update_freq: object, kl_clip: object, max_jacobian_numel: object,
              generator: object, param_groups: list[dict]) -> None:
    """Everything, as it stands now (called at the top of every ``step()``)."""
    check_options(fisher, update_freq, kl_clip, max_jacobian_numel, generator)
    for i, group in enumerate(param_groups):
        check_group(group, i)


def check_count(name: str, value: object) -> int:
    """A positive integer option (a byte cap, a count)."""
    if not isinstance(value, Integral) or isinstance(value, bool) or int(value) < 1:
        raise TENGraDError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TENGraDError(f"{name} must be True or False, got {value!r}")
    return value


def batch_dims(batch_dim) -> tuple[int, dict[str, int]]:
    """(dim of the model input holding the batch, {layer name: dim of that layer's input})."""
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, (int, dict)):
        raise TENGraDError(f"batch_dim must be an int or a dict {{layer name: dim}}, got {batch_dim!r}")
    if isinstance(batch_dim, int):
        return batch_dim, {}
    dims = dict(batch_dim)
    for k, v in dims.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise TENGraDError(f"batch_dim: entry {k!r}: {v!r} must map a layer name (str) to a dim >= 0")
    return dims.pop("", 0), dims


# ---------------------------------------------------------------------- param groups
def _param_list(params: object, where: str) -> list:
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, (str, bytes, dict, nn.Module)) or not isinstance(params, Iterable):
        raise TENGraDError(f"{where}['params'] must be an iterable of the model's parameters, got "
                           f"{type(params).__name__}" + (" (pass module.parameters())"
                                                         if isinstance(params, nn.Module) else ""))
    return list(params)


def build_groups(model: nn.Module, param_groups: object) -> list[dict]:
    """torch-style group dicts (missing hyperparameters are filled from the defaults by torch)."""
    every = list(model.parameters())     # frozen ones too: requires_grad is read at each step
    if param_groups is None:
        return [{"params": every}]
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
            kept.append(p)
        hyper = {k: spec[k] for k in GROUP_KEYS if k in spec}
        for k, v in hyper.items():
            check_value(k, v, where)
        groups.append({"params": kept, **hyper})
    rest = [p for p in every if id(p) not in claimed]
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
