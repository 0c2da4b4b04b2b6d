"""Capture at the operation: every call of a registered functional op (tengrad/layers/ops.py) that
reads a trainable parameter, or a view of one, during the captured training forward.

A ``torch.overrides.TorchFunctionMode`` is entered by a forward pre-hook on the root model and left by
its forward hook (``always_call``), only when the forward is a captured one (grad on, the model in
training mode, curvature due). Per op call the mode does one dict lookup (``func`` in the registered
ops) and, for those, one identity lookup per tensor argument in ``{id(param)}`` (a view is mapped
through ``t._base``); nothing is allocated when no parameter is read.

A *use* records the op input (detached), the plan of the op (``tengrad.compile`` of the shell module
built from the op's arguments, cached per arguments' shapes and hyperparameters), where each of the
op's parameter tensors sits in its parameter (``(param, first row)``; a slice such as the q rows of
``in_proj_weight`` starts at its storage offset) and, through a tensor hook on the op output, the
output gradient (``grad``) or the curvature passes' rows (``rows``), in a ``Use`` (record.py) as a
module-level capture (module.py) does.

Ops linear in a parameter that are no registered op (``torch.addmm``, ``torch.einsum``, ``x * w``,
``w.expand(..)``, ...: tengrad/layers/linear_ops.py) go to ``linear`` (capture/linear_uses.py), which
records them through the public ``owner`` and ``record``. Where a call can say where its sample is
(a size-1 dim broadcast over the batch, a tie among leading dims of a permuted view) the record is made
sample first there (``_canonical_record``, capture/sample.py).

Ops inside a module whose block is captured at module level (a module type with a registered spec,
``covered``) are not recorded again: its ``cover`` wrapper marks its parameters as covered.
``nn.MultiheadAttention`` runs ``F.multi_head_attention_forward``, a Python function whose projections
call functional's module-level ``linear``: during a captured forward that ``linear`` is a recording one
(``_mha_linear``, swapped once per forward) that records while a MultiheadAttention forward runs
(each such module's forward is wrapped for that forward, ``_enter_mha``); the function called at the
root under the mode is run with the recording ``linear`` too (``composite``). Those uses are marked
*sequence first* (``seq_first``): [T, N, E] inputs and the out projection's [T*N, E] rows (t-major).

What runs when: the root's gate pre-hook always; everything else only in forwards where curvature
is due. ``hooks`` (a ``HookSet``, hooks.py: the root's exit hook, the consistency check's) is on
whenever some block is due. Inside a captured forward nothing is a module hook: the gate installs
*wrappers* (wrappers.py, ``_install``; taken away when the backward through the forward ends,
``_release``) - the due blocks' LayerCaptures (which ``select(due)`` hands over), around each its
``cover`` when the mode runs, the mode's suspension in covered subtrees when the mode runs, and
MultiheadAttention's recording when ``select`` asks for the attention projections. Without
staggering (estimator/stagger.py) every block is due together and ``select`` asks for everything.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from tengrad.compiler.compiled import CompiledLayer
from tengrad.errors import TengradError
from tengrad.layers import ops as op_specs
from tengrad.optim.capture.hooks import (HookSet, OwnHook, always, get_gradient_edge, keep_grad, on_grad,
                                         store_grad, transformed)
from tengrad.optim.capture import sample
from tengrad.optim.capture.linear_uses import LINEAR_OPS, LinearUses
from tengrad.optim.capture.record import Use
from tengrad.optim.capture.wrappers import ForwardWraps
from tengrad_ir.lru import LRU

#: op plans kept, one per call signature (shapes, hyperparameters): least recently used go first
OP_PLANS_KEPT = 512

#: Python-level ops whose inner ops must be seen, and whose uses are sequence first
SEQ_FIRST_COMPOSITES = {F.multi_head_attention_forward}


class _Mode(TorchFunctionMode):
    def __init__(self, cap: "OpCapture") -> None:
        super().__init__()
        self.cap = cap

    def __torch_function__(self, func, types, args=(), kwargs=None):
        cap = self.cap
        if func in cap.ops:
            return cap.call(func, args, kwargs or {})
        if func in LINEAR_OPS:
            return cap.linear.call(func, args, kwargs or {})
        if func in SEQ_FIRST_COMPOSITES and cap._mha_depth == 0:
            return cap.composite(self, func, args, kwargs or {})
        if kwargs:
            return func(*args, **kwargs)
        return func(*args)


class OpCapture:
    """Records the uses of ``params`` ({id: (name, param)}) by registered ops in captured forwards."""

    def __init__(self, model: nn.Module, params: Callable[[], dict[int, tuple[str, Tensor]]],
                 armed: Callable[[], bool], phase: Callable[[], str], batch_dim: int = 0,
                 keep_edges: bool = False,
                 select: Callable[[bool], tuple[bool, bool, list]] | None = None,
                 accumulating: Callable | None = None, hold: Callable | None = None,
                 before_capture: Callable[[], None] | None = None) -> None:
        self.model = model
        self._before_capture = before_capture   # called once per captured root forward, before it records
        self.params = params
        self.accumulating = accumulating or always
        self.hold = hold or (lambda node: node)     # GradientPass.hold (hooks keep no node themselves)
        self._armed = armed
        self._phase = phase
        self.batch_dim = batch_dim
        self.batch_first = batch_dim == 0     # the model input is batch first (sample.by_provenance)
        self.linear = LinearUses(self)        # ops linear in a parameter without a registered spec
        self.keep_edges = keep_edges and get_gradient_edge is not None
        self._node_hooks = not keep_edges      # capture.on_grad: node pre-hooks unless edges are kept
        self.ops = op_specs.OPS
        self.covered: dict[int, int] = {}
        self.uses: list[Use] = []
        self.edges: list = []
        self.fwd = 0            # id of the last captured root forward
        self.m: int | None = None
        self.last_batch: int | None = None   # batch of the last training forward with grad (captured or not)
        self._seq = 0
        self._select = select or (lambda due: (due, due, []))
        self._active = False    # a captured root forward is running
        self._mode: _Mode | None = None
        self._suspended = 0     # depth of module-captured forwards the mode is suspended in
        self._mha_depth = 0
        self._linear_orig = None
        self._has_mha = False   # the model holds an nn.MultiheadAttention (skip_builtin_subtrees)
        self._patched = False   # functional's ``linear`` is the recording one for this forward
        self._plans = LRU(OP_PLANS_KEPT)   # op plans by call signature (``_key``), bounded
        self._ids: dict[int, tuple[str, Tensor]] = {}
        self._count: dict[str, int] = {}
        self._covers: dict[int, list[int]] = {}     # id(module) -> ids of its block's parameters (cover)
        self._suspenders: list[nn.Module] = []      # roots of subtrees the mode is suspended in
        self._wraps = ForwardWraps()                # this captured forward's module wrappers
        self._covering = 0      # module-captured forwards running (their parameters are covered)
        self._fast: dict = {}   # (op, x.dim(), ids/values of the other arguments) -> a recorded call
        self.hooks = HookSet()        # the root's exit and consistency hooks: off while no curvature is due
        self._mhas: list[nn.Module] = []    # every nn.MultiheadAttention of the model
        self._gate = model.register_forward_pre_hook(OwnHook(self._enter), with_kwargs=True)   # always on
        self.hooks.add(model.register_forward_hook(OwnHook(self._exit), always_call=True))

    # ------------------------------------------------------------------ root forward
    def _enter(self, module, args, kwargs) -> None:
        if self._wraps.installed:       # an earlier forward's, whose backward has not run: a new forward
            self._wraps.restore()
        due = self._armed()
        mode, mha, captures = self._select(due)     # what this forward needs, if it is captured
        if due != self.hooks.active:    # the exit hook exists only while it is needed (hooks.HookSet)
            (self.hooks.on if due else self.hooks.off)()
        if self._active or not (torch.is_grad_enabled() and module.training):
            return
        # the batch: the first tensor among the positional, then the keyword arguments (model(ids=...))
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)
        self.last_batch = (int(first.shape[self.batch_dim]) if isinstance(first, Tensor)
                           and first.dim() > self.batch_dim else None)
        if not due or (isinstance(first, Tensor) and transformed(first)):
            return
        if self._before_capture is not None:
            self._before_capture()
        self.fwd += 1       # a captured forward: its batch m is what its uses' rows are split by
        self.m = int(first.shape[self.batch_dim]) if isinstance(first, Tensor) and first.dim() > self.batch_dim else None
        self._ids = self.params()
        self._count = {}
        self._active = True
        if mode:
            self._mode = _Mode(self)
            self._mode.__enter__()
        mha = self._has_mha and mha
        if mha:
            g = F.multi_head_attention_forward.__globals__
            self._linear_orig = g["linear"]
            g["linear"] = self._mha_linear
            self._patched = True
        self._install(mode, mha, captures)

    def _install(self, mode: bool, mha: bool, captures: list) -> None:
        """This captured forward's module wrappers (wrappers.py: instance forwards, taken away by
        ``_release``), outermost first per module: the mode suspended in covered subtrees (``_suspend`` /
        ``_resume``, when the mode runs), a module-level block's cover (``_cover_wrap``, when the mode
        runs) around its capture (``captures``: (module, make) of the due blocks' LayerCaptures), and
        each MultiheadAttention's recording forward (``_enter_mha`` / ``_exit_mha``: its ``linear``
        calls are recorded, sequence first). Wrappers rather than forward hooks: a module with hooks
        leaves torch's fast call path and pays for the hook machinery on every call (the numbers:
        docs/experiments/capture-overhead.md), a wrapper costs one Python call, and installing it is a
        dict write."""
        plan: dict[int, tuple[nn.Module, list]] = {}

        def add(mod, kind):
            plan.setdefault(id(mod), (mod, []))[1].append(kind)

        if mode:
            for mod in self._suspenders:
                add(mod, "suspend")
        for mod, make in captures:
            if mod is self.model:       # the root's own capture runs in hooks (LayerCapture.attach)
                continue
            if mode and id(mod) in self._covers:
                add(mod, "cover")
            add(mod, make)
        if mha:
            for mod in self._mhas:
                add(mod, "mha")
        for mod, kinds in plan.values():
            key = tuple(kinds)
            self._wraps.install(mod, lambda mod=mod, kinds=kinds: [self._maker(mod, k) for k in kinds], key)

    def _maker(self, mod: nn.Module, kind) -> Callable:
        if kind == "suspend":
            return _around(self._suspend, self._resume)
        if kind == "cover":
            return self._cover_wrap(self._covers[id(mod)])
        if kind == "mha":
            return _around(self._enter_mha, self._exit_mha)
        return kind         # a LayerCapture's wrap

    def _mha_linear(self, *args, **kwargs):
        """functional's ``linear`` during a captured forward of a model with MultiheadAttention: a
        call from inside F.multi_head_attention_forward (``_mha_depth`` > 0: its q/k/v and out
        projections) is recorded, any other passes straight through.

        Installed once per captured forward (``_enter``/``_exit``) rather than around every attention
        call: each write to torch.nn.functional's globals invalidates CPython's specialised global and
        attribute lookups in every function of that module, which then run slowly for a while, so
        every write costs time in the forward that follows (docs/experiments/capture-overhead.md)."""
        if self._mha_depth:
            return self.call(self._linear_orig, args, kwargs)
        return self._linear_orig(*args, **kwargs)

    def _exit(self, module, args, output) -> None:
        self._active = False
        self._release(output)
        if self._patched:
            F.multi_head_attention_forward.__globals__["linear"] = self._linear_orig
            self._patched = False
        if self._mode is not None:
            mode, self._mode = self._mode, None
            if self._suspended == 0:
                mode.__exit__(None, None, None)
            self._suspended = 0

    def _release(self, output) -> None:
        """Take this forward's wrappers away when the backward through it ends (a hook on the output
        queues the engine callback), so a module forward autograd re-runs inside that backward -
        reentrant activation checkpointing, ``torch.utils.checkpoint(..., use_reentrant=True)`` - is
        captured as in the forward; at once when no output requires grad (or the forward raised). The
        next root forward, ``zero_grad()``, ``step()`` and ``remove_hooks()`` take them away too."""
        if not self._wraps.installed:
            return
        out = _first_grad_tensor(output)
        if out is None:
            self._wraps.restore()
            return
        restore = self._wraps.restore
        on_grad(out, lambda grad: torch.autograd.Variable._execution_engine.queue_callback(restore))

    def _suspend(self) -> None:
        if self._mode is not None:
            if self._suspended == 0:
                self._mode.__exit__(None, None, None)
            self._suspended += 1

    def _resume(self) -> None:
        if self._mode is not None and self._suspended:
            self._suspended -= 1
            if self._suspended == 0:
                self._mode.__enter__()

    def skip_builtin_subtrees(self, model: nn.Module, covered: set[int]) -> None:
        """Suspend the mode inside torch.nn modules whose whole subtree is torch.nn modules and whose
        trainable parameters are all captured otherwise (module-level blocks, MultiheadAttention's
        recording forward): torch.nn's own forwards read a parameter only through its owner's forward or inside
        F.multi_head_attention_forward, so the mode would see nothing there (and costs per op).

        Every nn.MultiheadAttention found is listed (``_mhas``) for its recording wrapper
        (``_enter_mha`` / ``_exit_mha``). Only the outermost such subtrees get the suspending wrapper
        (``_suspenders``), and the ``cover`` wrappers of blocks strictly inside them are dropped
        (``_covers``): the mode is already off there, and no op call inside can read those blocks'
        parameters (the only recording inside, MultiheadAttention's ``linear``, reads its own
        parameters, whose owners' forwards never run). Every wrapped module costs a Python call per
        forward, so this keeps the per-step cost to a few calls per subtree."""
        def builtin(mod):
            return type(mod).__module__.startswith("torch.nn.")

        inside: set[int] = set()     # modules strictly inside a suspended subtree
        for name, mod in model.named_modules():
            if mod is model:
                continue
            if isinstance(mod, nn.MultiheadAttention):
                self._has_mha = True
                self._mhas.append(mod)
            if id(mod) in inside:
                self._covers.pop(id(mod), None)
                continue
            subtree = list(mod.modules())
            if not all(builtin(s) for s in subtree):
                continue
            handled = covered | {id(p) for s in subtree if isinstance(s, nn.MultiheadAttention)
                                 for p in s.parameters(recurse=False)}
            if all(id(p) in handled for p in mod.parameters() if p.requires_grad):
                if id(mod) not in self._covers:   # a covered module suspends the mode itself
                    self._suspenders.append(mod)
                inside.update(id(s) for s in subtree if s is not mod)

    def _enter_mha(self) -> None:
        """MultiheadAttention's forward in a captured forward (its wrapper, ``_install``): record its
        projections (``linear`` inside F.multi_head_attention_forward, ``_mha_linear``) whether or not
        the mode runs or is suspended."""
        if not self._active:
            return
        self._mha_depth += 1
        self._seq += 1

    def _exit_mha(self) -> None:
        if self._mha_depth == 0:
            return
        self._mha_depth -= 1
        self._seq -= 1

    def cover(self, module: nn.Module, params: list[Tensor]) -> None:
        """``module`` is captured at module level: while the mode runs, it is suspended inside the
        module's forward (its inner ops are not captured again, and cost nothing), and its parameters
        count as covered there (``_cover_wrap``, installed around the block's capture when it is due)."""
        ids = [id(p) for p in params]
        if module is self.model:    # already running when the gate installs wrappers: hooks after the gate's
            state = {}

            def enter(mod, args):
                state["on"] = self._cover_on(ids)

            def leave(mod, args, out):
                if state.pop("on", False):
                    self._cover_off(ids)

            self.hooks.add(module.register_forward_pre_hook(OwnHook(enter)))
            self.hooks.add(module.register_forward_hook(OwnHook(leave), always_call=True))
            return
        self._covers[id(module)] = ids

    def _cover_on(self, ids: list[int]) -> bool:
        """Entering a covered module's forward: its parameters covered, the mode suspended (when it runs)."""
        if self._mode is None:
            return False
        for i in ids:
            self.covered[i] = self.covered.get(i, 0) + 1
        self._covering += 1
        self._suspend()
        return True

    def _cover_off(self, ids: list[int]) -> None:
        for i in ids:
            self.covered[i] -= 1
        self._covering -= 1
        self._resume()

    def _cover_wrap(self, ids: list[int]) -> Callable:
        def make(inner: Callable) -> Callable:
            def forward(*args, **kwargs):
                on = self._cover_on(ids)
                try:
                    return inner(*args, **kwargs)
                finally:
                    if on:
                        self._cover_off(ids)
            return forward
        return make

    # ------------------------------------------------------------------ inside the mode
    def composite(self, mode: _Mode, func, args, kwargs):
        """Run a sequence-first composite (``F.multi_head_attention_forward``) with its module-level
        ``linear`` replaced by a recording one, for this call only: its projections are seen, and
        its other ops run without the mode (no per-op dispatch cost). Not thread-safe: the composite's
        module globals are patched while it runs (one captured forward at a time)."""
        g = func.__globals__
        orig = g["linear"]

        def linear(*a, **kw):
            return self.call(orig, a, kw)

        g["linear"] = linear
        self._seq += 1
        try:
            return func(*args, **kwargs)
        finally:
            g["linear"] = orig
            self._seq -= 1

    def owner(self, t) -> tuple[str, Tensor] | None:
        """(name, parameter) of a tracked, uncovered parameter that ``t`` is or is a view of, else None."""
        return self._owner(t)

    def _owner(self, t) -> tuple[str, Tensor] | None:
        if not isinstance(t, Tensor):
            return None
        hit = self._ids.get(id(t))
        if hit is None and t._base is not None:
            hit = self._ids.get(id(t._base))
        if hit is not None and self.covered.get(id(hit[1]), 0):
            return None
        return hit

    def call(self, func, args, kwargs):
        """Run an op call; record it as a use if it reads block parameters (module docstring).

        Fast path: a call whose arguments other than the input are parameters themselves (not views)
        or plain values is looked up by (op, input rank, their identities/values) in ``_fast``,
        which holds its plan, parts, label and leading dims: per call then one key, one lookup, the
        Use and its gradient hook, instead of a plan key, owner lookups, a label and leading dims."""
        ids = self._ids
        if ids and not kwargs and not self._covering and args and isinstance(args[0], Tensor):
            try:
                key = (func, args[0].dim(), args[0].dtype,
                       *[id(a) if isinstance(a, Tensor) else a for a in args[1:]])
                hit = self._fast.get(key)
            except TypeError:            # an unhashable argument: the general path
                key = hit = None
            if hit is not None:
                tensors, plan, parts, label, lead = hit
                if id(parts[0][0]) not in ids:   # not tracked in this forward (a block not due)
                    return func(*args)
                if all(a is t for a, t in zip(args[1:], tensors)):
                    out = func(*args)
                    if isinstance(out, Tensor) and out.requires_grad and not transformed(out):
                        return self._canonical_record(out, args[0], plan, parts, label, lead)
                    return out
            if key is not None:          # not cached yet, or an id reused by another tensor
                return self._general(func, args, kwargs, key)
        return self._general(func, args, kwargs, None)

    def _canonical_record(self, out: Tensor, x: Tensor, plan, parts, label: str, lead: int) -> Tensor:
        """Record a registered op's call with its sample settled where the call can tell
        (capture/sample.py: a size-1 dim broadcast over the batch is expanded, a tie among the leading
        dims is broken by the view's provenance); returns what the call hands on."""
        m = self.m
        if m is not None and not self._seq:
            pair = sample.expand_batch(x, out, m)
            ids = sample.prepend_batch(x, out, m) if pair is None and lead >= x.dim() else None
            if pair is not None and all(x.shape[d] != m for d in range(min(lead, x.dim()))):
                x, out = pair
            elif ids is not None:       # ids [T] with no batch dim (F.embedding(arange(T), w)): [m, T]
                x, out = ids
                lead += 1
            elif self.batch_first and lead > 1:
                dims = [d for d in range(min(lead, x.dim())) if x.shape[d] == m]
                d = sample.by_provenance(x, dims, m) if len(dims) > 1 else None
                if d is not None:
                    yc = out.movedim(d, 0)
                    self.record(yc, x.movedim(d, 0), plan, parts, label, 1)
                    return yc.movedim(0, d)
        self.record(out, x, plan, parts, label, lead)
        return out

    def record(self, out: Tensor, x: Tensor, plan, parts, label: str, lead: int) -> None:
        """One use: ``x`` (kept detached) and a gradient hook on ``out`` (record.py ``Use``)."""
        k = self._count[label] = self._count.get(label, 0) + 1
        use = Use(f"{label}#{k}", plan, x.detach(), self.fwd, self.m, parts, lead, self._seq > 0)
        if self._node_hooks:
            keep_grad(out, use, self.uses, self.accumulating, self.hold)
            return
        on_grad(out, lambda grad, use=use, node=self.hold(out.grad_fn): self._backward(use, grad, node), False)
        if self.keep_edges:
            self.edges.append(get_gradient_edge(out))

    def _general(self, func, args, kwargs, key):
        ids = self._ids
        reads = False
        for a in args:
            if type(a) is not int and self._owner(a) is not None:   # noqa: E721 (fast path)
                reads = True
                break
        if not reads:
            for a in kwargs.values():
                if self._owner(a) is not None:
                    reads = True
                    break
        out = func(*args, **kwargs)
        if not reads or not ids or not isinstance(out, Tensor) or not out.requires_grad:
            return out
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor) or transformed(out):
            return out
        built = self._plan(func, args, kwargs)
        if built is None:
            return out
        plan, tensors = built
        parts = []
        for pname, _ in plan.params:
            t = tensors[pname]
            owner = self._owner(t)
            if owner is None:
                return out     # a trainable tensor that is no block parameter: leave this call alone
            try:
                parts.append((owner[1], _first_row(t, owner[1])))
            except TengradError:
                return out     # a view that is not a block of rows (W.T): no spec covers it; see _first_row
        label = owner[0] if len(parts) == 1 else parts_label(parts, ids)
        fname = getattr(func, "__name__", str(func))
        label = f"{fname}({label})"
        lead = op_specs.leading_dims(func, x, args, kwargs)
        if (key is not None and len(self._fast) < 1024
                and all(ids.get(id(a)) is not None and ids[id(a)][1] is a
                        for a in args[1:] if isinstance(a, Tensor))):
            self._fast[key] = (tuple(args[1:]), plan, parts, label, lead)
        return self._canonical_record(out, x, plan, parts, label, lead)

    def _key(self, func, args, kwargs):
        """What the op's plan depends on: the op, the parameters' shapes (a parameter or a view of one
        by shape only: slices are new views every forward), other tensors by identity (running
        statistics), the input's rank and dtype, and the other arguments by value."""
        def one(i, a):
            if isinstance(a, Tensor):
                if i == 0:
                    return ("x", a.dim(), a.dtype)
                if self._ids.get(id(a)) is not None or (a._base is not None and id(a._base) in self._ids):
                    return ("p", tuple(a.shape), a.dtype)
                return ("t", id(a), tuple(a.shape), a.dtype)
            try:
                hash(a)
                return a
            except TypeError:
                return repr(a)
        return (func, tuple(one(i, a) for i, a in enumerate(args)),
                tuple((k, one(1, v)) for k, v in sorted(kwargs.items())))

    def _plan(self, func, args, kwargs):
        key = self._key(func, args, kwargs)
        hit = self._plans.get(key)
        flat = list(args) + [kwargs[k] for k in sorted(kwargs)]
        if hit is not None:
            if hit is False:
                return None
            plan, where = hit
            return plan, {name: flat[i] for name, i in where.items()}
        try:
            built = op_specs.builder_for(func)(*args, **kwargs)
        except TengradError:
            built = None
        except Exception as exc:
            raise TengradError(f"the op builder for {getattr(func, '__name__', func)} raised "
                               f"{type(exc).__name__}: {exc}") from exc
        if built is not None:
            shell, tensors = built
            if any(p.device.type == "meta" for p in shell.parameters(recurse=False)):
                shell, tensors = op_specs.with_params(shell, tensors)   # a user's builder: the op's tensors
            try:
                plan = CompiledLayer(shell, backend="torch")
            except TengradError:
                built = None
        if built is None:
            self._plans[key] = False
            return None
        where = {}
        for name, t in tensors.items():
            pos = next((i for i, a in enumerate(flat) if a is t), None)
            if pos is None:
                raise TengradError(f"the op builder for {getattr(func, '__name__', func)} returned a tensor "
                                   f"for {name!r} that is not one of the op's arguments")
            where[name] = pos
        self._plans[key] = (plan, where)
        return plan, tensors

    def _backward(self, use: Use, grad: Tensor, node=None) -> None:
        store_grad(use, grad, self._phase(), self.uses, self.accumulating, node)

    # ------------------------------------------------------------------ the step's side
    def current_forward(self) -> tuple[int, int | None]:
        """(id, batch m) of the last captured root forward: what a module-level record is tagged with."""
        return self.fwd, self.m

    def clear_edges(self) -> None:
        self.edges = []

    def take(self) -> list[Use]:
        self._wraps.restore()
        uses, self.edges = list(self.uses), []
        self.uses.clear()             # the same list: the gradient hooks (keep_grad) append to it
        return uses

    def clear(self) -> None:
        self._wraps.restore()
        self.uses.clear()
        self.edges = []

    def remove(self) -> None:
        self._wraps.restore()
        self.hooks.remove()
        self._gate.remove()
        self._covers.clear()
        self._suspenders = []
        self._mhas = []
        self._has_mha = False


def _first_grad_tensor(output) -> Tensor | None:
    """The first tensor that requires grad in a forward's output (a tensor, or a tuple/list/dict of them)."""
    if isinstance(output, Tensor):
        return output if output.requires_grad else None
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for item in items:
        found = _first_grad_tensor(item)
        if found is not None:
            return found
    return None


def _around(before: Callable[[], None], after: Callable[[], None]) -> Callable:
    """A forward wrapper maker (wrappers.py): ``before()``, the forward, ``after()`` even if it raises."""
    def make(inner: Callable) -> Callable:
        def forward(*args, **kwargs):
            before()
            try:
                return inner(*args, **kwargs)
            finally:
                after()
        return forward
    return make


def _first_row(t: Tensor, p: Tensor) -> int | None:
    """None when ``t`` is ``p`` itself, else the first row of ``p`` that the slice ``t`` starts at.
    Any other view (a transpose ``W.T``) raises; the call is then not a use (the parameter stays in
    fallback, or its block's consistency check names it)."""
    if t is p:
        return None
    row = max(1, p[0].numel()) if p.dim() else 1
    off = t.storage_offset() - p.storage_offset()
    if (not t.is_contiguous() or tuple(t.shape[1:]) != tuple(p.shape[1:]) or off % row
            or t.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()):
        raise TengradError(f"a view of parameter shaped {tuple(p.shape)} read by an op is not a block of "
                           f"whole rows (view shape {tuple(t.shape)}, offset {off}); TENGraD maps row slices "
                           "(as MultiheadAttention's q/k/v) only")
    return off // row


def parts_label(parts, ids) -> str:
    names = []
    for p, _ in parts:
        n = ids[id(p)][0]
        names.append(n)
    return "+".join(dict.fromkeys(names))
