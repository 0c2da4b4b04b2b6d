"""Data-parallel TENGraD on torch.distributed: the exact global-batch step, spread over the ranks.

R ranks, rank r with m_r samples, global batch M = sum_r m_r. Per block, with the global gradient g
(gradients.py) and J = [J_1; ...; J_R] the ranks' rows stacked :

    d = (1/a) (g - J^T (K + M a I)^-1 J g),     K = J J^T  [M_rows, M_rows]

``mode="exact"`` (``ExactEstimator``, exact.py) computes exactly that, i.e. the step of one process
on the concatenated batch:

1. status: one all-gather of [failed, m_r, per block (active, |x_i|, |gy_i|, reps)]; any local error
   (capture, non-finite gradient, missing forward) makes every rank raise the same error here.
2. gradient: one all-reduce of [m_r g_r, m_r] (plain model), or nothing (DDP: its comm hook did it).
3. curvature steps: each block's factors or rows (owners.py) are gathered to its owner
   (async, launched for every block before any is waited on).
4. J g is local: J_r g with the global g, gathered to the owner (async).
5. the owner factors K + M a I (woodbury.factor: one retry with 10 a) and broadcasts
   [u = (K + M a I)^-1 J g, a used, failed] (async; owners work through their blocks in block order,
   so ranks owning different blocks compute at the same time).
6. J^T u = sum_r J_r^T u_r: one all-reduce of every block's J_r^T u_r plus a status element; an
   owner's failure (non-finite K, failed Cholesky) makes every rank raise the same error here.
   Every rank then has the same bits of d: no direction is broadcast.
Reuse steps (update_freq k) skip 1's capture and 3: the factor stays on the owner, the rows stay on
their ranks, and a step costs 4-6 only. The commit (parameters, momentum, kept curvature) happens only
after 6 succeeded on every rank, so parameters stay identical on all ranks.

``mode="local"`` (``AveragedEstimator``, averaged.py): every rank preconditions the global g with its
*own* batch's curvature (F_r = J_r^T J_r / m_r, the single-process step on its m_r samples) and the
directions are averaged, d = (1/R) sum_r (F_r + a I)^-1 g, in one all-reduce (with a status
element). This is an approximation of the global step (it is not (F + a I)^-1 g), cheaper in bytes
and with no owner; parameters stay bit-identical because the all-reduce hands every rank the same sum.

Under a prior (``prior="adam"``/``"soap"``, and step_rule="adam"; curvature/prior.py) both modes wait for the
global gradient after step 1 and write it into param.grad (``publish_gradients``, as DDP's hook leaves
it), so the prior's moments, the D taken from them and Adam's m are the same bits on every rank; the
rows then go under that D (R_r S^T) before they are exchanged ("exact": the owner's K is the global
batch's K' = R' R'^T, J g becomes R' S g and the direction S^T d') or solved ("local").

As in the single-process step, each block uses its param group's damping and weight decay, and a
block that took no part in the forward (curvature/usage.py) is skipped; every rank must agree on
which blocks took part and on the per-sample shapes (checked in step 1's all-gather: a disagreement
raises the same error everywhere).

Checkpoints: ``state_dict`` keeps parameters, momentum and the step count (identical on every rank)
but no distributed curvature; after ``load_state_dict`` the next step is a curvature step on every rank
(the owners' factors are recomputed from that step's batch). Each rank keeps its own Monte-Carlo
generator (rank 0's would make every rank draw the same labels).

NCCL: the collectives used (all_gather, all_reduce, gather, broadcast, async handles) exist for NCCL,
but only gloo on CPU is tested here; NCCL needs the tensors on the rank's CUDA device.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tengrad.optim.curvature import usage, woodbury
from tengrad.optim.capture.record import Use
from tengrad.optim.curvature.block import Block
from tengrad.optim.estimator.base import Direction, StepInput
from tengrad.optim.estimator import agreement
from tengrad.optim.estimator.comm import Failure, Traffic, raise_if_any, world
from tengrad.optim.estimator.gradients import (BatchSize, dense_grad, install_ddp_hook, is_ddp,
                                               reduce_gradients, split_gradients)
from tengrad.optim.errors import TENGraDError
from tengrad.optim import update

MODES = ("exact", "local")


def resolve(distributed, model: nn.Module):
    """The estimator for ``TENGraD(..., distributed=...)``, or None for a single-process optimizer.

    "auto" (the default): "exact" inside an initialised process group of more than one rank, else off.
    "exact"/"local": need an initialised group. None/"off": never distributed.
    """
    if distributed in (None, False, "off"):
        return None
    if distributed not in ("auto",) + MODES:
        raise TENGraDError(f"distributed must be 'auto', 'exact', 'local' or None, got {distributed!r}")
    ready = dist.is_available() and dist.is_initialized()
    if distributed == "auto":
        if not ready or dist.get_world_size() == 1:
            return None
        distributed = "exact"
    elif not ready:
        raise TENGraDError(f"distributed={distributed!r} needs an initialised torch.distributed process "
                           "group (torch.distributed.init_process_group, e.g. under torchrun)")
    from tengrad.optim.estimator.averaged import AveragedEstimator
    from tengrad.optim.estimator.exact import ExactEstimator
    return (ExactEstimator if distributed == "exact" else AveragedEstimator)(model)


class DistributedEstimator:
    """What both distributed estimators share: the schedule, the status all-gather, the global
    gradient, checkpoints (no distributed curvature is saved) and the traffic counters."""

    mode = ""
    noise_ratio = 1.0        # the noise ratio needs every rank's rows: not estimated (r = 1)

    def __init__(self, model: nn.Module, group=None) -> None:
        self.group = group
        self.ddp = is_ddp(model)
        self.batch = BatchSize(model)
        if self.ddp:
            install_ddp_hook(model, self.batch, group)
        self.kept: dict[str, object] = {}     # block name -> what this mode keeps between steps
        self.pending: dict[str, object] = {}
        self.traffic = Traffic()              # this rank's bytes in the last step
        self.bytes_sent = 0                   # ... and since construction
        self.steps_seen = 0
        self._settings = 0.0                  # the settings hash of the last agreed step
        self.global_grads: dict[int, Tensor] = {}   # {id(param): the global gradient} of the last step

    # ------------------------------------------------------------------ the estimator protocol
    def due(self, b: Block, steps: int, update_freq: int) -> bool:
        """Capture armed for block b: a curvature step, or no kept curvature for it (same on all ranks)."""
        return bool(b.params) and (steps % update_freq == 0 or b.name not in self.kept)

    def curvature_due(self, blocks: list[Block], steps: int, update_freq: int) -> bool:
        return any(self.due(b, steps, update_freq) for b in blocks)

    def due_blocks(self, blocks, steps, update_freq):
        return None

    def forget(self) -> None:
        """Nothing is worked out ahead of a step."""

    def drop(self, name: str) -> None:
        """Block ``name`` changed its parameters: its kept curvature no longer fits."""
        self.kept.pop(name, None)

    def commit(self) -> None:
        self.kept.update(self.pending)
        self.pending = {}

    def state(self, blocks: list[Block]) -> dict:
        return {"blocks": {}, "noise": None}

    def load(self, blocks: list[Block], prepared: dict) -> None:
        """Forget the kept curvature: the next step recomputes it on every rank."""
        self.kept.clear()
        self.pending.clear()

    def directions(self, step: StepInput, skipped: dict[str, str]) -> list[Direction]:
        """[(param, d, g, param group)], the same on every rank, or the same error raised on every rank;
        ``skipped`` gets the blocks that took no part (curvature/usage.py)."""
        self.traffic.reset()
        self.pending = {}
        try:
            return self.run(step, skipped)
        finally:
            self.global_grads = {}
            self.batch.next_step()
            self.bytes_sent += self.traffic.total
            self.steps_seen += 1

    def run(self, step: StepInput, skipped: dict[str, str]) -> list[Direction]:
        raise NotImplementedError

    @staticmethod
    def products(directions: list[Direction]) -> Tensor:
        """<d, g> of every direction, each read from its formed d (update.dots)."""
        return update.dots(directions)

    def remove(self) -> None:
        self.batch.remove()

    def batch_size(self, ms: list[int]) -> int:
        """m_r: the captured layers' batch on curvature steps (they must agree), else the model's."""
        if ms:
            if len(set(ms)) > 1:
                raise TENGraDError(f"the captured layers saw different batch sizes {sorted(set(ms))}")
            return ms[0]
        return self.batch.get()

    # ------------------------------------------------------------------ shared phases
    def records(self, step: StepInput, fail: Failure, skipped: dict[str, str]):
        """This rank's uses ({block index: module-level uses} on curvature blocks), the blocks taking
        part (usage.unused, like the single-process step) and the curvature blocks; errors go to fail.
        Op-level uses are not part of the distributed step (its blocks are the modules with a plan)."""
        recs, active, cur = {}, [False] * len(step.blocks), [False] * len(step.blocks)
        try:
            for i, b in enumerate(step.blocks):
                if not b.params:
                    skipped[b.name] = "frozen (no parameter of it requires grad)"
                    continue
                if b.name in step.changed:
                    raise TENGraDError(f"layer {b.name!r}: its trainable parameters changed between the forward "
                                       "and step(); with several ranks, change requires_grad before "
                                       "zero_grad() and the forward")
                due = self.due(b, step.steps, step.update_freq)
                uses = [u for u in step.uses.get(i, []) if u.parts is None] if due else []
                refuse_several(b, uses)
                why = usage.unused(b.params, uses[0] if uses else None)
                if why is not None:
                    skipped[b.name] = why
                    continue
                active[i], cur[i] = True, due
                if due:
                    recs[i] = uses
        except TENGraDError as err:   # raised on every rank at the status all-gather
            fail.record(err)
        return recs, active, cur

    def agree(self, params: list[Tensor], values: list, device) -> None:
        """At construction: every rank's model, parameters and hyperparameters agree (agreement.py)."""
        agreement.check(params, values, self.group, device, "construction")
        self._settings = agreement.settings_hash(values)

    def status(self, step: StepInput, fail: Failure, m_r: int, sig: list[float]) -> list[int]:
        """Step 1: all-gather [failed, m_r, forward batch, settings hash, parameter checksums,
        signature]; raises everywhere on any failure or disagreement (agreement.py): an empty batch
        on some rank, hyperparameters changed on some ranks only, then the failure of a rank."""
        rank, R = world(self.group)
        params = [p for group in step.groups for p in group["params"]]
        device = params[0].device     # NCCL needs CUDA tensors; gloo takes any
        h = agreement.settings_hash(step.settings) if step.settings is not None else 0.0
        sums = agreement.checksums(params) if h != self._settings else (0.0, 0.0)
        counted = self.batch.this_step()
        forward = -1.0 if counted is None else float(counted)
        status = torch.tensor([fail.flag, float(m_r), forward, h, *sums] + sig, dtype=torch.float64, device=device)
        table = [torch.empty_like(status) for _ in range(R)]
        agreement.collective(f"status all-gather of step {step.steps}", dist.all_gather, table, status,
                             group=self.group)
        self.traffic.add("(status)", "status all-gather", status)
        table = torch.stack(table)
        empty = (table[:, 2] == 0).nonzero()
        if len(empty):
            raise TENGraDError(f"rank {int(empty[0])} at step {step.steps}: an empty batch (0 samples in its "
                               "forward); every rank needs at least one sample per step (drop_last=True, or "
                               "DistributedSampler's padding) (raised on every rank; nothing was updated)")
        when = f"step {step.steps}"
        agreement.raise_if_different(table[:, 3:4], step.settings, self.group, when, ("hyperparameters",))
        agreement.raise_if_different(table[:, 4:6], None, self.group, when, agreement.COLUMNS[3:])
        self._settings = h
        raise_if_any(bool(table[:, 0].any()), fail, self.group, step.steps)
        for i, b in enumerate(step.blocks):
            cols = table[:, 6 + 4 * i:10 + 4 * i]
            if not bool((cols == cols[0]).all()):
                raise TENGraDError(
                    f"rank disagreement at step {step.steps}: layer {b.name!r} has (active, per-sample "
                    f"input numel, per-row output numel, rows per sample) = {cols.long().tolist()} by rank; "
                    "every rank must run the same model on batches with the same per-sample shape")
        return [int(v) for v in table[:, 1].tolist()]

    def gradients(self, step: StepInput, m_r: int):
        """Step 2 started: returns a function giving {id(param): global g + wd theta} when called."""
        params = [p for group in step.groups for p in group["params"]]
        dtype = torch.float32
        for p in params:
            dtype = torch.promote_types(dtype, woodbury.compute_dtype(p.dtype))
        if self.ddp:
            grads = [dense_grad(p).to(dtype) for p in params]
            work = None
        else:
            work, flat = reduce_gradients(params, m_r, dtype, self.group)
            self.traffic.add("(gradient)", "all-reduce", flat)

        def finish() -> dict[int, Tensor]:
            nonlocal grads
            if work is not None:
                work.wait()
                grads = split_gradients(flat, params)
            out, self.global_grads = {}, {}
            for p, g in zip(params, grads):
                cd = woodbury.compute_dtype(p.dtype)
                g = g.to(cd)
                self.global_grads[id(p)] = g
                wd = step.groups[step.where[id(p)]]["weight_decay"]
                out[id(p)] = g + wd * p.detach().to(cd) if wd else g
            return out

        return finish

    def publish_gradients(self, step: StepInput) -> None:
        """The global gradient (``gradients``) written into param.grad, in the parameter's dtype, where a
        gradient is (as DDP's comm hook leaves it; a DDP model's already is): a prior's second moments
        and step_rule="adam"'s first moments then read the same gradient on every rank. After the local
        checks, which compare this rank's rows with its own gradient."""
        if self.ddp:
            return
        for group in step.groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = self.global_grads[id(p)].to(p.dtype)

    @staticmethod
    def check_finite(step: StepInput, grads: dict[int, Tensor]) -> None:
        """Same data on every rank, so every rank raises the same error here."""
        for b in step.blocks:
            for n, p in zip(b.param_names, b.params):
                if p.grad is not None and not torch.isfinite(grads[id(p)]).all():
                    raise TENGraDError(f"layer {b.name!r}: non-finite gradient ({n})")
        for n, p in step.fallback:
            if p.grad is not None and not torch.isfinite(grads[id(p)]).all():
                raise TENGraDError(f"parameter {n!r}: non-finite gradient")

    @staticmethod
    def local_checks(step: StepInput) -> None:
        for b in step.blocks:
            for p in b.params:
                if p.grad is not None and not torch.isfinite(dense_grad(p)).all():
                    raise TENGraDError(f"layer {b.name!r}: non-finite gradient")
        for n, p in step.fallback:
            if p.grad is not None and not torch.isfinite(dense_grad(p)).all():
                raise TENGraDError(f"parameter {n!r}: non-finite gradient")

    # ------------------------------------------------------------------ printing
    def explain_lines(self, blocks: list[Block]) -> list[str]:
        rank, R = world(self.group)
        grad = ("DDP model: gradients reduced in backward by TENGraD's DDP comm hook as "
                "sum_r m_r g_r / M (exact for uneven batches), none sent in the step") if self.ddp else \
            ("plain model: the step all-reduces [m_r g_r, m_r] (sum_r m_r g_r / M, exact for uneven batches)")
        lines = [f"  distributed={self.mode!r} over {R} ranks ({dist.get_backend(self.group)}), this is rank "
                 f"{rank}; {grad}"]
        lines += self.mode_lines()
        by_layer = self.traffic.by_layer
        for b in blocks:
            sent = by_layer.get(b.name, {})
            last = ", ".join(f"{kind} {n} B" for kind, n in sent.items()) or "nothing"
            lines.append(self.block_line(b, last))
        for name in ("(status)", "(gradient)", "(all blocks)"):
            if name in by_layer:
                lines.append(f"    {name}: " + ", ".join(f"{kind} {n} B" for kind, n in by_layer[name].items()))
        lines.append(f"    this rank sent {self.traffic.total} B in the last step, {self.bytes_sent} B in "
                     f"{self.steps_seen} steps")
        return lines

    def mode_lines(self) -> list[str]:
        return []

    def block_line(self, b: Block, last: str) -> str:
        return f"    {b.name}: last step sent {last}"


def refuse_several(block, uses: list[Use]) -> None:
    """The distributed step takes one module call per block and forward (its blocks are modules with a
    plan; several calls in one forward are the single-process estimator's). Several forwards before one
    step (gradient accumulation, DDP's ``no_sync()``) are the union batch (curvature/build.py)."""
    calls: dict[int, int] = {}
    for u in uses:
        calls[u.fwd] = calls.get(u.fwd, 0) + 1
    if any(n > 1 for n in calls.values()):
        raise TENGraDError(
            f"layer {block.name!r} ({type(block.module).__name__}) received output gradients from "
            f"{max(calls.values())} calls in one forward: it is called more than once per forward (weight "
            "sharing); with several ranks TENGraD's per-layer curvature needs one call per forward")
