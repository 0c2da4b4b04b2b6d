"""The capture of a module-level block: the layer input x and its per-sample output gradients.

For a batch of m samples and a mean-reduced loss L = (1/m) sum_i l_i, autograd hands the layer's output
y (shape [m, ...]) the gradient ``grad = dL/dy = (1/m) dl_i/dy_i``; the per-sample output gradient is
``gy = m * grad`` . The Jacobian row of sample i is then the gradient of <gy_i, module(x)_i>
with respect to the block's parameters, which is what ``plan.gram / jvp / vjp`` take.

Capture rules (documented in the optimizer too):

* A forward call is recorded only when grad mode is on, the forward is a training forward (``training()``:
  the optimizer passes the root model's ``training`` flag, so a module kept in eval mode inside a model
  that trains, e.g. a frozen-statistics BatchNorm when fine-tuning, is still captured), the output
  requires grad and the optimizer needs curvature for its next step (``armed``). Eval-mode or no_grad
  forwards between steps therefore never touch what is captured nor the stored curvature.
* Calls inside torch.func transforms (vmap, grad, ...) are not recorded.
* What is seen is the root model's forward and the backward through it: the capture is the module's
  forward wrapper (``LayerCapture.wrap``), installed by ops.py for a captured root forward until the
  backward through it ends (wrappers.py: an instance ``forward``, no module hooks; so module forwards
  autograd re-runs in that backward, reentrant activation checkpointing, are captured; a block whose
  module is the root model itself captures through hooks, ``attach``). A call after the forward and
  before its backward is one more use of the block. A module called at any other time with gradients
  flowing to the loss leaves its block's gradient with a part the curvature does not see: the
  consistency check (curvature/consistency.py, on each block's first curvature step by default,
  every step with ``check=True``) refuses that step naming the layer.
* The record holds ``x.detach()`` (no copy) and gets its gradients from a hook on the output.
  A tensor hook sees the gradient of the output as the layer produced it, even if a later op modifies
  it in place (e.g. ``ReLU(inplace=True)``).
* In the "gradient" phase (the ordinary ``loss.backward()``) the hook stores ``grad``; in the
  "curvature" phase (extra backward passes run by ``TENGraD.backward`` for the Monte-Carlo or exact
  Fisher, already per-sample) it appends ``grad`` to ``rows``.
* ``out.retain_grad()`` is not used: it clones every gradient (contiguous); see
  docs/experiments/capture-overhead.md for the measurement.
* Only forward calls whose output received a gradient count (``take_all``: every such record since
  the last ``opt.zero_grad()`` or ``opt.step()``). Several calls of the module in one forward are
  uses of one block (curvature/uses.py sums their Jacobians); calls from several forwards (gradients
  accumulated over several backward passes) are refused naming the module (curvature/build.py).

Gradient from the Jacobian (``jacobian_grad_shape`` / ``on_jacobian_grad``, set for a block that keeps an
explicit Jacobian, on curvature steps of the empirical Fisher): the curvature step forms the per-sample
Jacobian J anyway, and g = J^T 1 / m is its column mean, so computing the ordinary weight gradient as
well is redundant (it is the same contraction as J, summed over the samples; docs/experiments/step-cost.md
for a conv). When the input of an armed call has shape ``jacobian_grad_shape`` and requires grad, the
wrapper hands the module *detached* views of the block's parameters for that one call (put back when
the call returns or raises); autograd then skips those weight gradients, and the output hook calls
``on_jacobian_grad(record, grad)``, which forms J, keeps it in ``record.jac`` and accumulates its column
sums into ``param.grad`` (so ``param.grad`` is there after ``backward()`` as usual).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from tengrad.optim.capture.hooks import (CURVATURE, OwnHook, always, get_gradient_edge, keep_grad, on_grad,
                                         store_grad, transformed)
from tengrad.optim.capture import sample
from tengrad.optim.capture.record import Use
from tengrad.optim.errors import TENGraDError


class LayerCapture:
    """The capture of one module-level block: a forward wrapper (``wrap``) that ops.py installs on
    the module for each captured root forward in which the block is due, until the backward through it
    ends (wrappers.py: the module's instance forward, no module hooks), plus the output gradient
    hook it registers; see the module docstring for the rules.

    ``armed()`` says whether the optimizer wants a record for its next step; ``phase()`` returns
    GRADIENT or CURVATURE for the backward pass that is running.
    """

    def __init__(self, name: str, module: nn.Module, plan, armed: Callable[[], bool],
                 phase: Callable[[], str], keep_edges: bool = False,
                 training: Callable[[], bool] | None = None,
                 forward: Callable[[], tuple[int, int | None]] | None = None,
                 accumulating: Callable = always, hold: Callable = lambda node: node) -> None:
        self._accumulating = accumulating
        self._hold = hold               # GradientPass.hold: hooks keep the node in a released holder
        self._forward_info = forward or (lambda: (0, None))
        self.name = name
        self.plan = plan
        self.module = module
        self._armed = armed
        self._phase = phase
        self._training = training if training is not None else (lambda: module.training)
        self._keep_edges = keep_edges and get_gradient_edge is not None
        self._keep_edges_asked = keep_edges
        self._received: list[Use] = []
        self._edges: list = []
        # gradient from the Jacobian (module docstring): set by the optimizer
        self.jacobian_grad_shape: tuple[int, ...] | None = None
        self.jacobian_grad_params: list[tuple[str, Tensor]] = []
        self.on_jacobian_grad: Callable[[Use, Tensor], None] | None = None
        self.jacobian_grad_calls = 0
        self.removed = False

    def set_jacobian_grad(self, shape: tuple[int, ...] | None) -> None:
        """Detach the block's parameters for armed calls with inputs of ``shape`` (None: never)."""
        self.jacobian_grad_shape = shape

    def wrap(self, inner: Callable) -> Callable:
        """The module's forward for one captured root forward: ``inner`` (its own forward) with the
        gradient-from-the-Jacobian parameter swap around it and the capture of (x, output) after it."""
        if self.removed:
            return inner

        def forward(*args, **kwargs):
            swapped = self._swap(args) if self.jacobian_grad_shape is not None else None
            if swapped is None:
                out = inner(*args, **kwargs)
            else:
                own = self.module._parameters
                try:
                    out = inner(*args, **kwargs)
                finally:                # put the parameters back, also when the forward raises
                    for name, p in swapped:
                        own[name] = p
            return self._forward(args, out, swapped)
        return forward

    def attach(self, hooks) -> None:
        """Capture through forward hooks instead (in ``hooks``, a HookSet): for a block whose module is
        the root model itself, whose forward is already under way when the gate installs the wrappers
        (``Module._call_impl`` looks ``forward`` up before it runs the pre-hooks). The root takes
        torch's slow call path anyway (the gate is a pre-hook)."""
        self._pre_swapped = None
        hooks.add(self.module.register_forward_pre_hook(OwnHook(self._pre_hook)))
        hooks.add(self.module.register_forward_hook(OwnHook(self._post_hook), always_call=True))

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        self._pre_swapped = self._swap(args) if self.jacobian_grad_shape is not None and not self.removed else None

    def _post_hook(self, module: nn.Module, args: tuple, output: object) -> None:
        swapped, self._pre_swapped = self._pre_swapped, None
        for name, p in swapped or ():
            module._parameters[name] = p
        if not self.removed:
            self._forward(args, output, swapped)

    def _swap(self, args: tuple) -> list[tuple[str, Tensor]] | None:
        """Hand the module detached views of the block's parameters for this call (module docstring:
        gradient from the Jacobian); the swapped (name, parameter) pairs, or None."""
        if self.on_jacobian_grad is None or not self.jacobian_grad_params:
            return None
        if not (args and isinstance(args[0], Tensor) and args[0].requires_grad
                and tuple(args[0].shape) == self.jacobian_grad_shape):
            return None
        if not (torch.is_grad_enabled() and self._training() and self._armed()) or transformed(args[0]):
            return None
        own = self.module._parameters
        if any(own.get(name) is not p for name, p in self.jacobian_grad_params):
            return None   # the module's parameters were replaced: leave this call alone
        for name, p in self.jacobian_grad_params:
            own[name] = p.detach()
        return list(self.jacobian_grad_params)

    def _forward(self, args: tuple, output: object, swapped) -> object:
        """Record the call; returns what the forward hands on: ``output``, or ``output`` expanded over the
        batch when the call has none (capture/sample.py ``expand_batch``: position ids [1, T])."""
        if not (torch.is_grad_enabled() and self._training() and self._armed()):
            return output
        if not isinstance(output, Tensor) or not output.requires_grad or transformed(output):
            return output
        if not args or not isinstance(args[0], Tensor):
            raise TENGraDError(f"layer {self.name!r} ({type(self.module).__name__}): TENGraD needs the "
                               "layer input as the first positional argument of its forward")
        fwd, m = self._forward_info()
        x = args[0]
        pair = sample.expand_batch(x, output, m) if swapped is None else None
        if pair is not None and all(x.shape[d] != m for d in range(x.dim())):
            x, output = pair
        elif swapped is None and (pair := sample.prepend_batch(x, output, m)) is not None:
            x, output = pair          # ids [T] with no batch dim (wpe(arange(T))): expanded to [m, T]
        record = Use(self.name, self.plan, x.detach(), fwd, m)
        base = x._base if x._base is not None else x
        record.made = base.grad_fn is not None   # an activation of this forward, not a view of a caller's buffer
        if not (swapped or self._keep_edges_asked):
            keep_grad(output, record, self._received, self._accumulating, self._hold)
            return output
        record.jacobian_grad = bool(swapped)
        on_grad(output, partial(self._backward, record, self._hold(output.grad_fn)), node=not self._keep_edges_asked)
        if self._keep_edges:
            self._edges.append(get_gradient_edge(output))
        return output

    def _backward(self, record: Use, node, grad: Tensor) -> None:
        phase = self._phase()
        if phase != CURVATURE and not self._accumulating(node):
            if torch.is_grad_enabled():      # create_graph: its result may enter the loss (build.py refuses
                record.graph_pass = True     # it for a J-grad call; the check names a penalty for the rest)
            return                  # an extra autograd.grad pass: neither recorded nor added to .grad
        if record.jacobian_grad and phase != CURVATURE:
            self.jacobian_grad_calls += 1
            self.on_jacobian_grad(record, grad.detach())
        store_grad(record, grad, phase, self._received)

    def peek(self) -> list[Use]:
        """The records that received gradients since the last take/clear (not taken)."""
        return list(self._received)

    def take_all(self) -> list[Use]:
        """Every record that received gradients since the last take/clear (several calls of the
        module in one forward are uses of one block, curvature/uses.py)."""
        received, self._edges = list(self._received), []
        self._received.clear()        # the same list: the gradient hooks (keep_grad) append to it
        return received

    def edges(self) -> list:
        """Gradient edges of the recorded outputs (kept only with ``keep_edges``), taken at forward
        time, so they point at the output as the layer produced it even after in-place ops."""
        return list(self._edges)

    def clear(self) -> None:
        self._received.clear()
        self._edges = []

    def clear_edges(self) -> None:
        self._edges = []

    def remove(self) -> None:
        """Never capture again (a wrapper made later passes the forward through)."""
        self.removed = True
