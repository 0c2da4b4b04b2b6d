"""Autograd and module hooks of the capture, and the switch that turns the root's hooks off.

Gradient hooks (``on_grad``, ``keep_grad``, ``store_grad``): how a captured output hands its gradient
to its record. In the "gradient" phase (the ordinary ``loss.backward()``) the hook stores ``grad`` =
dL/dy; in the "curvature" phase (the extra backward passes ``TENGraD.backward`` runs for the
Monte-Carlo or exact Fisher, already per-sample) it appends it to ``rows``.

``HookSet``: module hooks that are switched off while no curvature is due, and on again in their old
place. TENGraD's capture inside a forward runs in per-forward wrappers (wrappers.py), not hooks; the
hooks here are those on the root model (the gate's exit hook, the consistency check's forward hook,
the capture of a block whose module is the root itself). A module with any forward hook leaves
torch's fast call path (``Module._call_impl`` runs its hook machinery even when every hook returns at
once), so those hooks sit in a ``HookSet`` that the gate switches off on steps without curvature.

``off()`` takes each hook's entry out of the module's hook dicts (and the ``with_kwargs`` /
``always_call`` dicts its handle names) and remembers the order of the dict; ``on()`` puts it back
at the same place among the hooks that were there, so a hook the user registered before or after
the optimizer keeps running before or after TENGraD's as it did (new hooks registered while the set
was off: prepended ones stay first, others run after the ones that were there).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor
from torch.nn import Parameter
from torch.utils.hooks import RemovableHandle

try:
    from torch.autograd.graph import get_gradient_edge
except ImportError:  # pragma: no cover - torch < 2.3
    get_gradient_edge = None

GRADIENT = "gradient"
CURVATURE = "curvature"


WRAPPED_CHECK = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def transformed(t: Tensor) -> bool:
    """True inside torch.func transforms (vmap/grad): those calls are not the training forward."""
    return bool(WRAPPED_CHECK(t)) if WRAPPED_CHECK is not None else False


def on_grad(out: Tensor, fn: Callable[[Tensor], None], node: bool = True) -> None:
    """Call ``fn(grad)`` with the gradient of ``out`` in every backward pass through it, as
    ``out.register_hook(fn)`` does (``fn`` returns None: the gradient is not changed).

    With ``node`` (and ``out`` made by an op) the hook is a pre-hook of ``out.grad_fn`` reading the
    output's slot: the node a tensor hook would be bound to, so the same gradient (the output as the
    op produced it, even after later in-place ops), at less Python cost than
    ``Tensor.register_hook`` (no handle dict; docs/experiments/capture-overhead.md). Node pre-hooks
    do not run when a backward stops at the node (``torch.autograd.grad`` with gradient edges as
    inputs, the curvature passes of ``keep_edges``), so callers that capture edges pass
    ``node=False`` and get a tensor hook."""
    grad_fn = out.grad_fn if node else None
    if grad_fn is None:
        out.register_hook(fn)
        return
    on_node(grad_fn, out.output_nr, fn)


def on_node(node, i: int, fn: Callable[[Tensor], None]) -> None:
    """Call ``fn(grad)`` with the gradient of output ``i`` of autograd node ``node``."""
    def pre(grads):
        g = grads[i]
        if g is not None:
            fn(g)

    node.register_prehook(pre)


class GradientPass:
    """Whether the backward pass running now accumulates into the parameters' ``.grad``.

    Only such a pass (``loss.backward()``, also with ``create_graph``, and the backward of a reentrant
    checkpoint inside it) gives the gradient the step uses; an extra ``torch.autograd.grad(loss, ...)``
    pass (a logged gradient norm, a saliency map) or ``backward(inputs=[x])`` runs the same hooks, and
    recording it too would count its output gradients again (the Fisher would be 4F). Asked once per
    graph task (``torch._C._current_graph_task_id``) with the captured output's autograd node: the
    nearest parameter's gradient accumulator (breadth first, at most ``LIMIT`` nodes) is asked whether
    the engine runs it in this task; the engine refuses the question for a leaf that autograd.grad
    captures, which means the same (not accumulating). With no parameter within reach (a call whose
    parameters were detached for the gradient from the Jacobian, inside a reentrant checkpoint) the
    other leaves found answer; with no leaf at all, accumulating.
    """

    LIMIT = 256

    def __init__(self) -> None:
        self._task: int | None = None
        self._answer = True
        self._held: list[list] = []

    def hold(self, node) -> list:
        """A holder [node] for a hook to pass to ``accumulating`` instead of the node itself. A hook
        registered on a node (or on a tensor bound to it) that kept the node in its closure would make a
        cycle through autograd's C++ hook list, which Python's gc cannot see: the step's whole graph and
        its records would never be freed (a leak of one curvature step per step). ``release`` empties
        the holders when the step's records are taken or cleared."""
        holder = [node]
        self._held.append(holder)
        return holder

    def release(self) -> None:
        for holder in self._held:
            holder[0] = None
        self._held = []

    def accumulating(self, node) -> bool:
        """``node``: the captured output's autograd node, or a holder from ``hold`` (released: True,
        its step is over)."""
        if type(node) is list:
            node = node[0]
        task = torch._C._current_graph_task_id()
        if task == self._task:
            return self._answer
        if node is None:
            return True
        answer = _runs_a_leaf(node, self.LIMIT)
        self._task, self._answer = task, answer
        return answer


def _runs_a_leaf(node, limit: int) -> bool:
    """Whether this task runs the gradient accumulator of a parameter near ``node`` (breadth first,
    at most ``limit`` nodes); with no parameter there, of another leaf (a reentrant checkpoint's
    detached input); with no leaf at all, True."""
    seen, queue, others = set(), [node], []
    while queue and len(seen) < limit:
        n = queue.pop(0)
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if type(n).__name__ == "AccumulateGrad":
            if not isinstance(n.variable, Parameter):
                others.append(n)
                continue
            try:
                return bool(torch._C._will_engine_execute_node(n))
            except RuntimeError:        # a parameter autograd.grad captures: an extra pass
                return False
        queue.extend(f for f, _ in n.next_functions)
    try:
        return any(torch._C._will_engine_execute_node(n) for n in others) if others else True
    except RuntimeError:
        return False


def always(node=None) -> bool:
    return True


def _same(node):
    return node


def keep_grad(out: Tensor, record, received: list, accumulating: Callable = always, hold: Callable = _same) -> None:
    """``store_grad`` in the GRADIENT phase as one tensor hook on ``out`` (the empirical Fisher's
    capture: no curvature passes run through it), without the dispatch through ``on_grad`` /
    ``partial`` / ``phase()``.

    Registered the way ``Tensor.register_hook`` does it, minus its ``RemovableHandle``: the output is
    fresh (made by the op this forward), so it has no hook dict yet; a dict ``{0: hook}`` becomes its
    ``_backward_hooks`` and ``grad_fn._register_hook_dict`` binds that dict to the node slot of the
    output (as a tensor hook: the gradient of the output as the op produced it, even after a later
    in-place op). That skips what ``register_hook`` / ``register_prehook`` build (handle, weak
    reference, ordered dict), whose cost is paid per captured output of every curvature step
    (docs/experiments/capture-overhead.md). A hook the user adds later goes into the same dict
    through ``register_hook`` and removes itself as usual.
    An output that already has a hook dict, or a torch without ``_register_hook_dict``, takes
    ``register_hook``. ``accumulating()`` (GradientPass): passes that do not accumulate into
    ``.grad`` are not recorded."""
    node = hold(out.grad_fn)     # not the node itself: a cycle through C++ (GradientPass.hold)

    def hook(g):
        if not accumulating(node):
            if torch.is_grad_enabled():     # a create_graph pass: its result may enter the loss (the check
                record.graph_pass = True    # names a mismatch then as a gradient penalty, consistency.py)
            return
        if g.requires_grad:         # create_graph backward: keep the value, not the graph
            g = g.detach()
        record.grad = g if record.grad is None else record.grad + g
        for r in received:          # identity: records define no __eq__
            if r is record:
                return
        received.append(record)

    grad_fn = out.grad_fn
    if grad_fn is None or out._backward_hooks is not None or not hasattr(grad_fn, "_register_hook_dict"):
        out.register_hook(hook)
        return
    out._backward_hooks = OrderedDict(((0, hook),))     # weak-referable, as a handle needs
    grad_fn._register_hook_dict(out)


def store_grad(record, grad: Tensor, phase: str, received: list, accumulating: Callable = always,
               node=None) -> None:
    """Keep a captured output gradient on ``record`` (a ``Use``, record.py: ``grad``, ``rows``):
    appended to ``rows`` in the CURVATURE phase, else stored as ``grad`` (a second ordinary backward
    through the same graph, retain_graph, accumulates; a pass that does not accumulate into ``.grad``
    is not recorded, ``GradientPass``); the record joins ``received`` once."""
    if phase == CURVATURE:
        record.rows.append(grad.detach())
    elif not accumulating(node):
        return
    elif record.grad is None:
        record.grad = grad.detach()
    else:
        record.grad = record.grad + grad.detach()
    if not any(r is record for r in received):
        received.append(record)


class HookSet:
    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []
        self.active = True
        self._saved: list = []

    def add(self, handle: RemovableHandle) -> RemovableHandle:
        """Track a hook just registered (by its handle); returns the handle."""
        self.handles.append(handle)
        if not self.active:                    # registered while off: take it out at once
            self._take_out([handle])
        return handle

    def off(self) -> None:
        if self.active:
            self.active = False
            self._take_out(self.handles)

    def _take_out(self, handles) -> None:
        orders: dict[int, list] = {}
        for handle in handles:
            d = handle.hooks_dict_ref()
            if d is None or handle.id not in d:
                continue
            if id(d) not in orders:
                orders[id(d)] = list(d.keys())
            extras = [(ref(), ref()[handle.id]) for ref in handle.extra_dict_ref
                      if ref() is not None and handle.id in ref()]
            fn = d.pop(handle.id)
            for e, _ in extras:
                del e[handle.id]
            self._saved.append((handle, d, orders[id(d)], fn, extras))

    def on(self) -> None:
        if self.active:
            return
        self.active = True
        saved, self._saved = self._saved, []
        by_dict: dict[int, tuple[dict, list, dict]] = {}
        for handle, d, order, fn, extras in saved:
            for e, v in extras:
                e[handle.id] = v
            entry = by_dict.setdefault(id(d), (d, order, {}))
            entry[2][handle.id] = fn
        for d, order, ours in by_dict.values():
            _restore(d, order, ours)

    def remove(self) -> None:
        self.on()
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _restore(d: dict, order: list, ours: dict) -> None:
    """Put ``ours`` back into hook dict ``d`` at their places in ``order`` (the keys when taken out)."""
    now = list(d.items())
    known = set(order)
    first_known = next((i for i, (k, _) in enumerate(now) if k in known), len(now))
    front = [kv for kv in now[:first_known] if kv[0] not in known]      # prepended while off
    back = [kv for kv in now[first_known:] if kv[0] not in known]       # appended while off
    present = dict(now)
    middle = [(k, ours[k]) if k in ours else (k, present[k]) for k in order if k in ours or k in present]
    d.clear()
    d.update(front + middle + back)


class OwnHook:
    """A hook TENGraD registers on the user's model: calls ``fn``. A copy of the model
    (``copy.deepcopy(model)``, as for an EMA twin, or a pickle) gets a hook that does nothing instead
    of a deep copy of the optimizer behind ``fn``: the copy is a plain model, neither a second front
    end of this optimizer nor a half-copied one that fails in its first forward."""

    __slots__ = ("fn",)

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo) -> "Inert":
        return Inert()

    def __reduce__(self):
        return (Inert, ())


class Inert:
    """What a copied TENGraD hook becomes: returns None (leaves the call as it is)."""

    def __call__(self, *args, **kwargs) -> None:
        return None
