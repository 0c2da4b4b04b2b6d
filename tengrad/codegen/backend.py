"""The backend interface: a backend runs the IR's steps (``tengrad_ir.steps``), one handler per step
kind it supports, and says which those are, so a plan never asks for a step a backend would swap.

    backend.name                      "torch", "triton"
    backend.supports(step) -> bool    whether it has a handler for the step (``step.key``)
    backend.describe(step, classes)   what runs the step (printed under it by ``print(plan)``; classes:
                                      the plan's class sizes {"m", "N_g", ...}, for a size-dependent kernel)
    backend.bind(spec, sizes, x, g)   a ``Run``: the term bound to X (one dim per ``kind.x_indices``;
                                      None for ones) and G (one dim per output index)
    run.execute(order, p=, u=)        the order's steps in turn; returns the last step's result
                                      (K [m, m], Jp [m], JTu [param...], J [m, param...]) in G's dtype

``StepRun`` is the shared loop: it looks up each step's handler, runs it, and appends the step to
``run.trace`` when that is a list (the test that what prints is what runs reads it).
``backend_named`` loads a backend lazily: naming triton imports triton, nothing else does.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from tengrad_ir import LayerSpec, Order, Step, enumerate_orders

from ..errors import TengradError
from .einsum import Add

BACKENDS = ("torch", "triton")


class Run(Protocol):
    trace: list | None

    def execute(self, order: Order, p: torch.Tensor | None = None, u: torch.Tensor | None = None) -> torch.Tensor: ...


class Backend(Protocol):
    name: str

    def supports(self, step: Step) -> bool: ...

    def describe(self, step: Step, classes: dict[str, int] | None = None) -> str: ...

    def bind(self, spec: LayerSpec, sizes: dict[str, int], x: torch.Tensor | None, g: torch.Tensor) -> Run: ...


Handler = Callable[["StepRun", Step, dict], torch.Tensor]


class StepRun:
    """One term bound to tensors; ``execute`` runs an order's steps through ``handler(step)``.

    ``gram/jvp/vjp/jacobian(..., order_name)`` look the order up in the IR by name (a convenience
    for tests and benchmarks; ``tengrad.compile`` passes the planned ``Order`` itself)."""

    trace: list | None = None

    def __init__(self, spec: LayerSpec, sizes: dict[str, int], x: torch.Tensor | None, g: torch.Tensor):
        self.spec, self.sizes, self.x, self.g = spec, sizes, x, g
        self.m = g.shape[0]
        self.param_shape = [sizes[i] for i in spec.param_indices]

    def handler(self, step: Step) -> Handler:
        raise NotImplementedError

    def finish(self, order: Order, out: torch.Tensor) -> torch.Tensor:
        return out

    def execute(self, order: Order, p: torch.Tensor | None = None, u: torch.Tensor | None = None,
                add: Add | None = None) -> torch.Tensor:
        """The order's result; with ``add`` (einsum.Add: c shaped like the result, e.g. a parameter
        beside its vjp, and beta) the result + beta * c: in the last step's own product where its
        handler can (``adds``: the torch backend's contractions, as one addmm), else one addition after it."""
        env = {"X": self.x, "G": self.g}
        if p is not None:
            env["p"] = p.reshape(self.param_shape)
        if u is not None:
            env["u"] = u
        last = order.steps[-1]
        for step in order.steps:
            handler = self.handler(step)
            if step is last and add is not None and getattr(handler, "adds", False):
                env[step.out.name] = handler(self, step, env, add=add)
                add = None
            else:
                env[step.out.name] = handler(self, step, env)
            if self.trace is not None:
                self.trace.append(step)
        out = self.finish(order, env[last.out.name])
        if add is not None:
            out = add.after(out)
        return out

    def _order(self, quantity: str, name: str) -> Order:
        for o in enumerate_orders(self.spec)[quantity]:
            if o.name == name:
                return o
        raise TengradError(f"{self.spec.name}: no {quantity} order {name!r}; valid: "
                           f"{[o.name for o in enumerate_orders(self.spec)[quantity]]}")

    def jacobian(self) -> torch.Tensor:
        """J[n, param...], [m, *param]."""
        return self.execute(enumerate_orders(self.spec)["jacobian"][0])

    def gram(self, order: str) -> torch.Tensor:
        """K = J J^T, [m, m]."""
        return self.execute(self._order("gram", order))

    def jvp(self, p: torch.Tensor, order: str) -> torch.Tensor:
        """(J p)[n], [m]; p shaped like the parameter."""
        return self.execute(self._order("jvp", order), p=p)

    def vjp(self, u: torch.Tensor, order: str) -> torch.Tensor:
        """(J^T u)[param...], shaped like the parameter; u: [m]."""
        return self.execute(self._order("vjp", order), u=u)


def backend_named(name: str) -> Backend:
    """The backend called ``name`` (a TengradError names the valid ones, or the missing package)."""
    if name == "torch":
        from .torch_backend import TORCH
        return TORCH
    if name == "triton":
        try:
            from .triton.backend import TRITON
        except ImportError as exc:
            raise TengradError(f"backend='triton' needs the triton package (pip install 'tengrad[triton]'): "
                               f"{exc}") from None
        return TRITON
    raise TengradError(f"unknown backend {name!r}; valid: {BACKENDS + ('auto',)}")
