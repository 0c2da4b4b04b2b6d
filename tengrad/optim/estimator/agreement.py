"""Ranks agree on what they train: the same model, the same parameters, the same hyperparameters.

The distributed step keeps replicas bit-identical only if they start identical and step with the
same settings; a plain model initialised with another seed on one rank, or ``lr`` / ``kl_clip`` changed
on one rank only, would make them drift apart silently. So each rank condenses what must agree into
a fixed-size fingerprint (the same length on every rank, whatever its model: a model of another depth
cannot break the collective), all-gathers it, and every rank raises the same ``ReplicaMismatchError``
naming the first rank that differs from rank 0 and what differs:

    [number of parameter tensors, their total numel, hash of the hyperparameters, checksums c1, c2]
    c1 = sum_t sum(theta_t),  c2 = sum_t (t + 1) sum(theta_t^2)      (float64; replicas: the same bits)

Checked at construction (every column), and in every step's status all-gather (distributed.py): the
hyperparameter hash each step (a few floats), the parameter checksums on a step whose hyperparameters
changed since the last one on this rank (a pass over the parameters only then). When hyperparameters
differ, the values are all-gathered (the error path only) so the error names the setting and each
rank's value. A collective that fails (a peer that died, or stalled past the group's timeout) is
raised as ``PeerError``.
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import Tensor

from tengrad.optim.errors import TENGraDError

GROUP_KEYS = ("lr", "damping", "momentum", "weight_decay")
COLUMNS = ("number of parameter tensors", "number of parameters", "hyperparameters",
           "parameter values (checksum)", "parameter values (checksum)")


class ReplicaMismatchError(TENGraDError):
    """The ranks' models, parameters or hyperparameters differ."""


class PeerError(TENGraDError):
    """A collective with the other ranks failed: a peer died or stalled past the group's timeout."""


def settings(groups: list[dict], options: dict) -> list[tuple[str, object]]:
    """The hyperparameters that must agree: every group's lr/damping/momentum/weight_decay and
    ``options`` (fisher, update_freq, kl_clip, ...), as (name, value)."""
    out = [(f"param_groups[{i}].{k}", g.get(k)) for i, g in enumerate(groups) for k in GROUP_KEYS]
    return out + sorted(options.items())


def settings_hash(values: list[tuple[str, object]]) -> float:
    """48 bits of a SHA-256 of the settings (exact in float64)."""
    return float(int(hashlib.sha256(repr(values).encode()).hexdigest()[:12], 16))


@torch.no_grad()
def checksums(params: list[Tensor]) -> tuple[float, float]:
    c1 = c2 = 0.0
    for t, p in enumerate(params):
        d = p.detach().to(torch.float64)
        c1 += float(d.sum())
        c2 += (t + 1) * float((d * d).sum())
    return c1, c2


def fingerprint(params: list[Tensor], values: list[tuple[str, object]]) -> list[float]:
    return [float(len(params)), float(sum(p.numel() for p in params)), settings_hash(values), *checksums(params)]


def collective(what: str, fn, *args, **kwargs):
    """Run a collective; a failure of the group (dead or stalled peer) raises PeerError naming ``what``."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as err:           # gloo/NCCL errors (DistBackendError is one)
        raise PeerError(f"distributed TENGraD: the {what} with the other ranks failed: a peer died, left its "
                        f"process group or stalled past the group's timeout ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from err


def check(params: list[Tensor], values: list[tuple[str, object]], group, device, when: str) -> None:
    """All-gather this rank's fingerprint; every rank raises the same ReplicaMismatchError if any differs."""
    mine = torch.tensor(fingerprint(params, values), dtype=torch.float64, device=device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    collective(f"agreement check ({when})", dist.all_gather, table, mine, group=group)
    raise_if_different(torch.stack(table).cpu(), values, group, when)


def raise_if_different(table: Tensor, values: list[tuple[str, object]] | None, group, when: str,
                       columns: tuple[str, ...] = COLUMNS) -> None:
    """``table`` [R, C]: one row per rank (the same table on every rank). Columns named "hyperparameters"
    gather the settings' values to name the one that differs (every rank takes that path together)."""
    same = (table == table[0]).all(0)
    if bool(same.all()):
        return
    rank = int((table != table[0]).any(1).nonzero()[0])
    what = sorted({columns[c] for c in range(table.shape[1]) if not bool(same[c])})
    detail = ""
    if "hyperparameters" in what and values is not None:
        every: list = [None] * dist.get_world_size(group)
        collective("agreement check (hyperparameter values)", dist.all_gather_object, every, values, group=group)
        diffs = [f"{name}: " + ", ".join(f"rank {r} {dict(v).get(name)!r}" for r, v in enumerate(every))
                 for name, _ in every[0] if len({repr(dict(v).get(name)) for v in every}) > 1]
        detail = "; " + "; ".join(diffs)
    fix = (" Build the model identically on every rank (the same seed, or broadcast rank 0's parameters, "
           "e.g. by wrapping it in DistributedDataParallel before TENGraD) and change hyperparameters on "
           "every rank alike (a scheduler on every rank).")
    raise ReplicaMismatchError(f"distributed TENGraD ({when}): rank {rank} differs from rank 0 in "
                               f"{', '.join(what)}{detail}.{fix}")
