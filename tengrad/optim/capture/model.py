"""The capture pass of one model: what runs in the forward and backward, and what a step takes from it.

Pieces (one file each):

    hooks.py     gradient hooks (a captured output hands its gradient to its record), HookSet, OwnHook
    record.py    ``Use``: the one record of a captured use (input, output gradients, sample layout, slice)
    module.py    ``LayerCapture``: a module-level block's forward wrapper (its own forward's x and gy)
    ops.py       ``OpCapture``: the root gate, the op-level TorchFunctionMode, MultiheadAttention's
                 recording; it installs the due blocks' wrappers for each captured forward
    wrappers.py  per-forward instance wrappers (no module hooks inside the forward)

``ModelCapture`` wires them for one model and a list of blocks. What it asks of the optimizer are
three callables: ``armed()`` (curvature due for the next step), ``block_due(block)`` and, when
staggered, ``due_blocks()`` (the blocks refreshing at this step); ``take(due)`` hands a step every
due block's uses (module calls and op calls) and clears the rest.

Staggered steps (estimator/stagger.py) capture only the due blocks: only their wrappers are
installed, the parameters the op-level mode tracks are theirs and the fallback's, and the mode /
MultiheadAttention's recording run only when a due block had uses there at its last capture
(``Block.mode_used`` / ``mha_used``; a block not captured yet turns both on).

Records no step consumed are bounded (``drop_stale``): at the start of each captured forward, the
records held from earlier forwards (each holds a layer input and its output gradient) are dropped when
no tracked parameter holds a nonzero gradient any more, i.e. the gradients they belong to were reset
(``zero_grad()`` of any optimizer, ``model.zero_grad()``, ``p.grad = None``) and no ``step()`` took
them. An optimizer nobody steps any more (dropped, but still referenced by its LR scheduler, its hooks
never removed) therefore holds at most one step's records; gradient accumulation (several forwards
and backwards into the same ``.grad`` before one ``step()``) keeps every forward's records, since
the gradients are nonzero at each later forward. ``remove_hooks()`` stops capture altogether.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from torch import Tensor, nn

from tengrad.optim.capture.hooks import CURVATURE, GRADIENT, GradientPass
from tengrad.optim.capture.module import LayerCapture
from tengrad.optim.capture.ops import OpCapture
from tengrad.optim.capture.record import Use


class ModelCapture:
    def __init__(self, model: nn.Module, blocks: list, fallback: list, armed: Callable[[], bool],
                 block_due: Callable[[object], bool], due_blocks: Callable[[], list] | None,
                 batch_dim: int, keep_edges: bool, on_jacobian_grad: Callable) -> None:
        self.model = model
        self.blocks = blocks             # the optimizer's list (promotion appends to it)
        self.fallback = fallback         # [(name, param)], replaced by ``set_fallback``
        self.phase = GRADIENT            # CURVATURE while TENGraD.backward runs its curvature passes
        self._due_blocks = due_blocks
        self._memo: tuple | None = None  # staggered: (due list, tracked params, select's answer)
        self._tracked = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}
        self.passes = GradientPass()     # only backward passes that accumulate into .grad count
        self.ops = OpCapture(model, self._tracked_params, armed, lambda: self.phase, batch_dim,
                             keep_edges=keep_edges, select=self._select, accumulating=self.passes.accumulating,
                             hold=self.passes.hold,
                             before_capture=self.drop_stale)
        self.dropped = 0                 # records dropped by ``drop_stale`` (none consumed them)
        for b in blocks:                 # armed per block: a block without curvature yet arms only itself
            if not b.module_level:       # captured at its ops only
                continue
            b.capture = LayerCapture(b.name, b.module, b.plan, partial(block_due, b), lambda: self.phase,
                                     keep_edges=keep_edges, training=lambda: model.training,
                                     forward=self.ops.current_forward, accumulating=self.passes.accumulating,
                                     hold=self.passes.hold)
            b.capture.jacobian_grad_params = [] if b.plan is None else list(b.plan.params)
            b.capture.on_jacobian_grad = partial(on_jacobian_grad, b)
            if b.module is model:        # the root: hooks after the gate's (wrappers.py wraps submodules)
                b.capture.attach(self.ops.hooks)
            self.ops.cover(b.module, b.params)
        self.ops.skip_builtin_subtrees(model, {id(p) for b in blocks if b.capture is not None for p in b.params})
        self._all = [(b.module, b.capture.wrap) for b in blocks if b.capture is not None]
        self._kinds: dict[int, tuple[bool, bool]] = {}

    @property
    def hooks(self):
        """The root's hooks switched off while no curvature is due (hooks.HookSet)."""
        return self.ops.hooks

    def rewire(self, b) -> None:
        """Block ``b``'s trainable set changed (curvature/block.py ``refresh``): its capture records with
        the new plan, detaches the new parameters for the gradient from the Jacobian (once a curvature
        step has chosen the path again) and covers them from the op-level mode."""
        if b.capture is None:
            return
        b.capture.plan = b.plan
        b.capture.jacobian_grad_params = [] if b.plan is None else list(b.plan.params)
        b.capture.set_jacobian_grad(None)
        self.ops.cover(b.module, b.params)
        self.forget()

    def set_fallback(self, fallback: list) -> None:
        self.fallback = fallback
        self.forget()

    def forget(self) -> None:
        """Drop what was worked out for this step (the due blocks changed: step, promotion, load)."""
        self._memo = None

    # ------------------------------------------------------------------ the gate's questions
    def _staggered_memo(self) -> tuple:
        due = self._due_blocks()
        memo = self._memo
        if memo is None or memo[0] is not due:        # once per step
            ids = {id(p) for b in due for p in b.params}
            ids.update(id(p) for _, p in self.fallback)
            tracked = {i: v for i, v in self._tracked.items() if i in ids}
            select = (any(b.mode_used is not False for b in due), any(b.mha_used is not False for b in due),
                      [(b.module, b.capture.wrap) for b in due if b.capture is not None])
            memo = self._memo = (due, tracked, select)
        return memo

    def _tracked_params(self) -> dict[int, tuple[str, Tensor]]:
        """The parameters the op-level mode records uses of in this captured forward: all trainable
        ones; staggered, those of the due blocks and the fallback (a fallback read by an op with a spec
        becomes a block, curvature/block.py ``promote``)."""
        if self._due_blocks is None:
            return self._tracked
        return self._staggered_memo()[1]

    def _select(self, due: bool) -> tuple[bool, bool, list]:
        """Whether this forward, if captured, needs the op-level mode and MultiheadAttention's
        recording, and the (module, make) wrappers of the module-level captures to install for it."""
        if not due:
            return False, False, []
        if self._due_blocks is None:
            return True, True, self._all
        return self._staggered_memo()[2]

    # ------------------------------------------------------------------ the step's side
    def take_ops(self) -> list[Use]:
        """The op-level uses of this step (the optimizer may promote fallback parameters they read)."""
        return self.ops.take()

    def take(self, op_uses: list[Use], due: Callable[[object], bool]) -> dict[int, list[Use]]:
        """{block index: its uses in this step} for the blocks ``due`` refresh (module calls first,
        then op calls); every block's module records are cleared, and the hooks' node holders released
        (hooks.py ``GradientPass.hold``: the step's graph is freed with its last tensor)."""
        self.passes.release()
        owner = {id(p): i for i, b in enumerate(self.blocks) for p in b.params}
        by_block: dict[int, list[Use]] = {}
        for u in op_uses:
            i = next((owner[id(pt[0])] for pt in u.parts if pt is not None and id(pt[0]) in owner), None)
            if i is not None:
                by_block.setdefault(i, []).append(u)
        out: dict[int, list[Use]] = {}
        self._kinds = {}
        for i, b in enumerate(self.blocks):
            if not due(b):
                if b.capture is not None:
                    b.capture.clear()
                continue
            ops = by_block.get(i, [])
            self._kinds[i] = (any(not u.seq_first for u in ops), any(u.seq_first for u in ops))
            out[i] = (b.capture.take_all() if b.capture is not None else []) + ops
        return out

    def commit(self) -> None:
        """The step succeeded: remember which kinds of op-level uses each captured block had."""
        for i, (outside, inside) in self._kinds.items():
            self.blocks[i].mode_used, self.blocks[i].mha_used = outside, inside
        self._kinds = {}

    @property
    def last_batch(self) -> int | None:
        """The batch (``batch_dim`` of the first input) of the last training forward with grad enabled."""
        return self.ops.last_batch

    def held(self) -> int:
        """How many records (uses that received output gradients) wait for a step."""
        return sum(len(b.capture.peek()) for b in self.blocks if b.capture is not None) + len(self.ops.uses)

    def drop_stale(self) -> None:
        """Before a captured forward: drop the held records when their gradients were reset since
        (module docstring). Costs nothing while none are held; while accumulating, one ``any()`` on the
        first parameter that holds a gradient."""
        held = self.held()
        if held == 0 or _gradients_held(p for _, p in self._tracked.values()):
            return
        self.dropped += held
        self.passes.release()
        for b in self.blocks:
            if b.capture is not None:
                b.capture.clear()
        self.ops.uses.clear()
        self.ops.edges = []

    def clear(self) -> None:
        self.passes.release()
        for b in self.blocks:
            if b.capture is not None:
                b.capture.clear()
        self.ops.clear()

    def edges(self) -> list:
        """Gradient edges of the captured outputs (``keep_edges``): what the curvature passes stop at."""
        return [e for b in self.blocks if b.capture is not None for e in b.capture.edges()] + list(self.ops.edges)

    def curvature_passes(self, run: Callable[[], None]) -> None:
        """Run ``run()`` (the Fisher's extra backward passes) in the curvature phase; edges forgotten."""
        self.phase = CURVATURE
        try:
            run()
        finally:
            self.phase = GRADIENT
            for b in self.blocks:
                if b.capture is not None:
                    b.capture.clear_edges()
            self.ops.clear_edges()

    def remove(self) -> None:
        for b in self.blocks:
            if b.capture is not None:
                b.capture.remove()
        self.ops.remove()


def _gradients_held(params) -> bool:
    """Whether some parameter holds a nonzero gradient (stops at the first one that holds any gradient
    and is nonzero; a gradient zeroed in place, ``zero_grad(set_to_none=False)``, counts as reset)."""
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            g = g.coalesce().values()
        if bool(g.any()):
            return True
    return False
