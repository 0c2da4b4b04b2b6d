"""Finding the Fisher blocks of a model: one per module that ``tengrad.compile`` accepts.

A module becomes a block when it has trainable parameters of its own (``recurse=False``) and
compiling it (``CompiledLayer(module, backend=...)``) succeeds; the block holds the plan's trainable parameters
(``plan.params``: weight and bias together, frozen ones left out). Every other trainable parameter is a
*fallback* parameter, preconditioned by the damped identity d = g / a (the same scale as a block whose
Jacobian vanishes), until an op with a spec reads it in a captured forward: ``promote`` then makes
it part of a block (capture/ops.py). At construction, fallback comes from ``UnsupportedLayerError``,
modules without a spec (MultiheadAttention's in_proj_*) and parameters shared between modules.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from tengrad.compiler import CompiledLayer
from tengrad.errors import UnsupportedLayerError
from tengrad.layers import factory_for
from tengrad.optim.capture.module import LayerCapture
from tengrad.optim.errors import TENGraDError
from tengrad.optim.curvature.paths import PathChoice
from tengrad.optim.curvature.woodbury import BlockCurvature
from tengrad_ir.lru import LRU

#: path choices a block keeps, by (x.shape, gy.shape): the least recently used go first
CHOICES_KEPT = 64


def _choices() -> LRU:
    return LRU(CHOICES_KEPT)


@dataclass(eq=False)
class Block:
    name: str
    module: nn.Module
    plan: CompiledLayer | None          # None: a block found from op-level uses only (promote)
    params: list[nn.Parameter]
    param_names: list[str]
    capture: LayerCapture | None = None
    curv: BlockCurvature | None = None
    choice: PathChoice | None = None
    choices: LRU = field(default_factory=_choices)   # {(x.shape, gy.shape): PathChoice}, bounded
    uses: list[str] = field(default_factory=list)   # the calls of the last curvature step (several: uses.py)
    offset: int = 0                 # its index: the step of the cycle it refreshes on (estimator/stagger.py)
    mode_used: bool | None = None   # its last capture had op-level uses outside MultiheadAttention
    mha_used: bool | None = None    # ... inside MultiheadAttention (None: not captured yet)
    module_level: bool = True       # its parameters are its module's own (else given: op-level uses)
    prefix: str = ""                # the module's qualified name (parameter names are prefix.name)
    given: list = field(default_factory=list)   # op-level blocks: every parameter given, frozen or not
    param_names_given: list = field(default_factory=list)
    own: tuple = ()                 # module-level: its module's parameters that trained at the last refresh
    memory_reuse: bool = False      # moved from its explicit J to x and gy by the memory budget (budget.py)

    def __post_init__(self) -> None:
        if not self.module_level and not self.param_names_given:
            self.param_names_given = list(self.param_names)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def resolve_backend(model: nn.Module, backend: str) -> str:
    """'auto' is 'torch' on CPU; elsewhere it is handed on to the compiler."""
    if backend != "auto":
        return backend
    devices = {p.device.type for p in model.parameters()}
    return "torch" if devices <= {"cpu"} else "auto"


#: parameters of nn.MultiheadAttention that its F.linear projections read (bias_k/bias_v: no spec)
MHA_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias")


def find_blocks(model: nn.Module, backend: str, op_blocks: bool = True
                ) -> tuple[list[Block], list[tuple[str, nn.Parameter]], dict[str, str]]:
    """(blocks, fallback (name, param) pairs, {module name: why it fell back})."""
    owners: dict[int, list[str]] = {}
    for mname, module in model.named_modules():
        for _, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(mname)

    candidates: list[Block] = []
    why: dict[str, str] = {}
    for mname, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        label = mname or type(module).__name__
        if not own:
            if dormant(module) and all(len(owners[id(p)]) == 1 for p in module.parameters(recurse=False)):
                candidates.append(Block(label, module, None, [], [], prefix=mname))   # frozen: may wake
            continue
        shared = [n for n, p in own if len(owners[id(p)]) > 1]
        if shared:
            why[label] = f"parameter(s) {shared} shared with {owners[id(dict(own)[shared[0]])]}"
            continue
        if op_blocks and isinstance(module, nn.MultiheadAttention):
            proj = [(n, p) for n, p in own if n in MHA_PROJECTIONS]
            if proj:      # captured at its F.linear calls (capture/ops.py); a block from the start
                names = [f"{mname}.{n}" if mname else n for n, _ in proj]
                candidates.append(Block(label, module, None, [p for _, p in proj], names, module_level=False,
                                        prefix=mname, given=[p for _, p in proj]))
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
        candidates.append(Block(label, module, plan, plan_params, names, prefix=mname))

    for i, b in enumerate(candidates):
        b.offset = i
        if b.module_level:
            b.own = tuple(p for p in b.module._parameters.values() if p is not None and p.requires_grad)
    return candidates, fallback_of(model, candidates), why


def fallback_of(model: nn.Module, blocks: list[Block]) -> list[tuple[str, nn.Parameter]]:
    """Every parameter of the model that no block holds or may hold: a module-level block's module's
    own parameters belong to it frozen or not (``refresh`` takes them in when they train); the rest,
    frozen ones too (one unfrozen later steps as g / a)."""
    covered = {id(p) for b in blocks for p in b.params}
    covered |= {id(p) for b in blocks if b.module_level for p in b.module.parameters(recurse=False)}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in covered]


def dormant(module: nn.Module) -> bool:
    """A module whose parameters are all frozen but whose type has a spec: a block that may wake."""
    try:
        factory_for(module)
    except UnsupportedLayerError:
        return False
    return any(True for _ in module.parameters(recurse=False))


def _same(a, b) -> bool:
    """The same parameters in the same order (identity: tensors' == is elementwise)."""
    return len(a) == len(b) and all(p is q for p, q in zip(a, b))


def refresh(b: Block, backend: str) -> bool:
    """Re-read which of the block's parameters train now (``requires_grad``, as torch.optim does at
    each step); True when that changed. A module-level block recompiles its plan for the new set (no
    parameter training: no plan, the block is frozen); an op-level block keeps the given parameters that
    train. A change drops the kept curvature and path choices: the block refreshes at its next
    curvature step."""
    if b.module_level:
        # the module's own parameters (its _parameters dict: named_parameters' generator costs more on a
        # path every step takes) against the plan's, in order; then the fallback parameters it took in
        # (``promote``'s host: ``given``), which train or not on their own
        live = [p for p in b.module._parameters.values() if p is not None and p.requires_grad]
        same = _same(live, b.own)
        extra = [(n, p) for n, p in zip(b.param_names_given, b.given) if p.requires_grad]
        if same and (not b.given or _same(b.params, [p for _, p in (b.plan.params if b.plan is not None else [])]
                                          + [p for _, p in extra])):
            return False
        if not same:
            b.own = tuple(live)
            b.plan = CompiledLayer(b.module, backend=backend) if live else None
        pairs = [] if b.plan is None else list(b.plan.params)
        b.params = [p for _, p in pairs] + [p for _, p in extra]
        b.param_names = [f"{b.prefix}.{n}" if b.prefix else n for n, _ in pairs] + [n for n, _ in extra]
    else:
        live = [p for p in b.given if p.requires_grad]
        if _same(live, b.params):
            return False
        names = dict(zip(map(id, b.given), b.param_names_given))
        b.params, b.param_names = live, [names[id(p)] for p in live]
    b.curv, b.choice, b.choices = None, None, _choices()
    return True



def promote(model: nn.Module, blocks: list[Block], fallback: list, uses) -> tuple[list[Block], list]:
    """Fallback parameters read by ops with a spec in this forward become blocks (capture/ops.py).

    Parameters read by one op call belong to one block: a use touching fallback parameters and one
    existing block adds them to that block; fallback parameters read only together form a new block
    named after their owner module(s) (``enc.layers.0.self_attn`` for ``in_proj_weight`` and
    ``in_proj_bias``). A use touching two existing blocks is refused (they would have to merge).
    ``blocks`` is extended in place; returns (the new blocks, the remaining fallback)."""
    fb = {id(p): n for n, p in fallback if p.requires_grad}
    owner = {id(p): b for b in blocks for p in b.params}
    parent: dict[int, int] = {}

    def find(i):
        while parent.setdefault(i, i) != i:
            i = parent[i]
        return i

    touched = False
    for u in uses:
        ids = [id(pt[0]) for pt in u.parts if pt is not None]
        if not any(i in fb for i in ids):
            continue
        touched = True
        hosts = {id(owner[i]): owner[i] for i in ids if i in owner}
        if len(hosts) > 1:
            raise TENGraDError(f"use {u.name!r} reads parameters of blocks {[b.name for b in hosts.values()]}"
                               " together; TENGraD cannot merge blocks after construction")
        for i in ids[1:]:
            parent[find(i)] = find(ids[0])
        for i in ids:
            find(i)
    if not touched:
        return [], fallback
    comps: dict[int, list[int]] = {}
    for i in parent:
        comps.setdefault(find(i), []).append(i)
    by_id = {id(p): p for _, p in fallback}
    modules = dict(model.named_modules())
    new = []
    for members in comps.values():
        extra = [i for i in members if i in fb]
        if not extra:
            continue
        host = next((owner[i] for i in members if i in owner), None)
        params = [by_id[i] for i in extra]
        names = [fb[i] for i in extra]
        if host is not None:
            host.params.extend(params)
            host.param_names.extend(names)
            host.given.extend(params)
            host.param_names_given.extend(names)
            host.curv = None
            continue
        b = _op_block(modules, model, params, names, len(blocks), {b.name for b in blocks})
        blocks.append(b)
        new.append(b)
    moved = {i for members in comps.values() for i in members if i in fb}
    return new, [(n, p) for n, p in fallback if id(p) not in moved]


def _op_block(modules: dict, model: nn.Module, params: list, names: list[str], offset: int,
              taken: set[str]) -> Block:
    """The op-level block of fallback parameters read together, named after their owner module(s), or
    after the parameters themselves where a block (``taken``) has that name already: two layer-scale
    gammas of one module (``blk.ls1 * h``, ``blk.ls2 * h``) were both "blk", and checkpoints, explain()
    and the kept curvature are keyed by name (the second block's curvature replaced the first's)."""
    mods = list(dict.fromkeys(n.rsplit(".", 1)[0] if "." in n else "" for n in names))
    name = "+".join(m or "+".join(n for n in names if "." not in n) for m in mods)
    if name in taken:
        name = "+".join(names)
    return Block(name, modules.get(mods[0], model), None, params, names, offset=offset, module_level=False,
                 given=list(params))


def op_layout(blocks: list[Block]) -> dict[str, dict[str, list[str]]]:
    """What ``promote`` built at the steps so far, for a checkpoint to build again before the first forward
    (``promote_saved``): {"new": {op-level block: the parameter names given}, "joined": {module-level
    block: the fallback parameter names it took in}}."""
    return {"new": {b.name: list(b.param_names_given) for b in blocks if not b.module_level},
            "joined": {b.name: list(b.param_names_given) for b in blocks if b.module_level and b.given}}


def promote_saved(model: nn.Module, blocks: list[Block], fallback: list, layout: object
                  ) -> tuple[list[Block], list[Block], list]:
    """(the op-level blocks of a checkpoint's ``op_layout`` that ``blocks`` lacks, copies of the blocks that
    took in fallback parameters with those parameters, the fallback left): built as ``promote`` builds
    them from the fallback parameters of the names saved (those that train now), so that a fresh optimizer
    can take the curvature they kept before its first step. Nothing given is changed (``join`` commits a
    copy); an entry whose names are not all fallback parameters here is left out (its curvature is then
    refused by name or shape, checkpoint.py)."""
    if not isinstance(layout, dict):
        return [], [], fallback
    by_name = {n: p for n, p in fallback}
    taken: set[str] = set()

    def free(names) -> bool:
        return (isinstance(names, (list, tuple)) and len(names) > 0
                and all(isinstance(n, str) and n in by_name and n not in taken for n in names))

    have = {b.name: b for b in blocks}
    modules = dict(model.named_modules())
    new, joined = [], []
    for name, names in (layout.get("new") or {}).items():
        if name in have or not free(names):
            continue
        b = _op_block(modules, model, [by_name[n] for n in names], list(names), len(blocks) + len(new),
                      set(have) | {c.name for c in new})
        if b.name != name:
            continue
        b.params = [p for p in b.given if p.requires_grad]
        b.param_names = [n for n, p in zip(names, b.given) if p.requires_grad]
        new.append(b)
        taken.update(names)
    for name, names in (layout.get("joined") or {}).items():
        host = have.get(name)
        if host is None or not host.module_level or host.given or not free(names):
            continue
        params = [by_name[n] for n in names]
        live = [(n, p) for n, p in zip(names, params) if p.requires_grad]
        joined.append(replace(host, params=host.params + [p for _, p in live],
                              param_names=host.param_names + [n for n, _ in live],
                              given=list(params), param_names_given=list(names)))
        taken.update(names)
    return new, joined, [(n, p) for n, p in fallback if n not in taken]


def join(host: Block, copy: Block) -> None:
    """Commit ``promote_saved``'s copy of ``host`` (the fallback parameters it takes in) to ``host``."""
    host.params, host.param_names = copy.params, copy.param_names
    host.given, host.param_names_given = copy.given, copy.param_names_given
