"""Finding the Fisher blocks of a model: one per module that ``tengrad.compile`` accepts.

A module becomes a block when it has trainable parameters of its own (``recurse=False``) and
compiling it (``CompiledLayer(module, backend=...)``) succeeds; the block holds the plan's trainable parameters
(``plan.params``: weight and bias together, frozen ones left out). Every other trainable parameter is a
*fallback* parameter, preconditioned by the damped identity d = g / a (the same scale as a block whose
Jacobian vanishes). Fallback comes from ``UnsupportedLayerError`` and from parameters shared
between modules (tied weights): a parameter must belong to one block only, so every module touching a
shared parameter falls back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from tengrad.compiled import CompiledLayer
from tengrad.errors import UnsupportedLayerError
from tengrad.optim.capture import LayerCapture
from tengrad.optim.paths import PathChoice
from tengrad.optim.woodbury import BlockCurvature


@dataclass(eq=False)
class Block:
    name: str
    module: nn.Module
    plan: CompiledLayer
    params: list[nn.Parameter]
    param_names: list[str]
    capture: LayerCapture | None = None
    curv: BlockCurvature | None = None
    choice: PathChoice | None = None
    choices: dict[tuple, PathChoice] = field(default_factory=dict)   # by (x.shape, gy.shape)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def resolve_backend(model: nn.Module, backend: str) -> str:
    """'auto' is 'torch' on CPU; elsewhere it is handed on to the compiler."""
    if backend != "auto":
        return backend
    devices = {p.device.type for p in model.parameters()}
    return "torch" if devices <= {"cpu"} else "auto"


def find_blocks(model: nn.Module, backend: str) -> tuple[list[Block], list[tuple[str, nn.Parameter]], dict[str, str]]:
    """(blocks, fallback (name, param) pairs, {module name: why it fell back})."""
    owners: dict[int, list[str]] = {}
    for mname, module in model.named_modules():
        for _, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(mname)

    candidates: list[Block] = []
    why: dict[str, str] = {}
    for mname, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        label = mname or type(module).__name__
        shared = [n for n, p in own if len(owners[id(p)]) > 1]
        if shared:
            why[label] = f"parameter(s) {shared} shared with {owners[id(dict(own)[shared[0]])]}"
            continue
        try:
            plan = CompiledLayer(module, backend=backend)
        except UnsupportedLayerError as err:
            why[label] = f"unsupported ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
            continue
        plan_params = [p for _, p in plan.params if p.requires_grad]
        if not plan_params:
            continue
        names = [f"{mname}.{n}" if mname else n for n, p in plan.params if p.requires_grad]
        candidates.append(Block(label, module, plan, plan_params, names))

    covered = {id(p) for b in candidates for p in b.params}
    fallback = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    return candidates, fallback, why

