"""The estimator protocol: when blocks refresh their curvature, and the step's directions.

An estimator turns one step's captured uses and gradients into preconditioned directions
d_b = (F_b + a_b I)^-1 g_b per block (and g / a for the fallback parameters), builds every block's
curvature through curvature/build.py, and keeps it between steps. The optimizer calls

    due(block, steps, update_freq)        whether block refreshes at this step (the capture's gate asks)
    curvature_due(blocks, steps, k)       whether any block does
    due_blocks(blocks, steps, k)          the due blocks, or None when the capture need not select
    directions(step, skipped)             [(param, d, g, group)] for the step; nothing is kept yet
    products(directions)                  <d, g> of each (update.dots; the local estimator knows its blocks')
    commit()                              keep what ``directions`` built (after every check passed)
    noise_ratio                           r for the KL clip (noise.py); 1 where it is not estimated
    state() / load(prepared)              the checkpointed part (kept curvature, noise statistics)
    explain_lines(blocks), remove()       its lines of ``opt.explain()``; take away its own hooks

Three estimators: ``LocalEstimator`` (one process: plain, staggered, blocks with several uses),
``ExactEstimator`` and ``AveragedEstimator`` (torch.distributed: the global batch's exact step, or
own-batch directions averaged); the distributed ones decide only where rows or factors are gathered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from torch import Tensor

from tengrad.optim.capture.record import Use
from tengrad.optim.curvature.block import Block
from tengrad.optim.curvature.build import Rules
from tengrad.optim.curvature.consistency import ConsistencyCheck
from tengrad.optim.options import group_of_block

Direction = tuple[Tensor, Tensor, Tensor, dict]     # (param, d, g, its param group)


@dataclass
class StepInput:
    """What one step hands the estimator."""
    steps: int                              # steps taken before this one
    update_freq: int
    blocks: list[Block]
    fallback: list[tuple[str, Tensor]]
    groups: list[dict]                      # the optimizer's param_groups
    where: dict[int, int]                   # id(param) -> group index
    uses: dict[int, list[Use]]              # block index -> its captured uses (due blocks)
    rules: Rules
    check: ConsistencyCheck
    changed: frozenset[str] = frozenset()   # blocks whose trainable set changed since the forward
    row_factor: float = 1.0                 # the loss convention's factor on the rows (curvature/conventions.py)
    settings: list | None = None            # hyperparameters every rank must share (estimator/agreement.py)
    grads: dict | None = None               # {id(param): what the step preconditions in place of its gradient}
    adam_scale: bool = False                # step_rule="adam": each block's d scaled by prior.adam_scale
    # step_rule="adam" on several ranks: called once the global gradient is in param.grad (the distributed
    # estimators write it there), returns {id(param): Adam's bias-corrected m}: ``grads`` of that step
    moments: Callable[[], dict] | None = None

    def group(self, b: Block) -> dict:
        return self.groups[group_of_block(b.name, b.param_names, b.params, self.where)]


class Estimator(Protocol):
    noise_ratio: float

    def due(self, b: Block, steps: int, update_freq: int) -> bool: ...
    def curvature_due(self, blocks: list[Block], steps: int, update_freq: int) -> bool: ...
    def due_blocks(self, blocks: list[Block], steps: int, update_freq: int) -> list[Block] | None: ...
    def directions(self, step: StepInput, skipped: dict[str, str]) -> list[Direction]: ...
    def products(self, directions: list[Direction]) -> Tensor: ...
    def commit(self) -> None: ...
    def state(self, blocks: list[Block]) -> dict: ...
    def load(self, blocks: list[Block], prepared: dict) -> None: ...
    def explain_lines(self, blocks: list[Block]) -> list[str]: ...
    def forget(self) -> None: ...
    def drop(self, name: str) -> None: ...
    def remove(self) -> None: ...
