"""``tengrad.compile(module)``: a module's terms, planned per size and run by a backend.

J is the m x p matrix whose row i is the gradient of ``<gy[i], module(x)[i]>`` w.r.t. the module's
trainable parameters (in ``module.parameters()`` order). A module's parameters form one block, so

    K = sum_terms K_term,  J p = sum_terms J_term p_term,  J^T u = (J_term^T u for each term).

The jobs are split: ``terms.match_terms`` pairs parameters with spec terms, ``binding.Shapes``
infers sizes and checks tensors, ``module_plan.ModulePlan`` holds the sized plans, and a backend
(``codegen.backend``) runs the chosen orders' steps. ``CompiledLayer`` keeps the caches: the plan per
(shapes, dtype, backend) and the last (x, gy) binding.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tengrad_ir import DEFAULT_MEMORY_CAP, PROGRAMS, Order, SizedPlan, enumerate_orders, kind_of

from tengrad_ir.lru import LRU

from .binding import Shapes
from .checks import check_call
from ..codegen.backend import BACKENDS, Backend, backend_named
from ..codegen.einsum import Add
from ..errors import ShapeError, TengradError
from ..layers.term import Term
from .module_plan import ModulePlan
from .terms import match_terms


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: plans a layer keeps, one per (input shape, output shape, dtype, backend): least recently used go first
PLANS_KEPT = 128


class CompiledLayer:
    """The compiled per-layer quantities of one module (see module docstring).

    ``trace``: set to a list to record, per term and call, ``(param, quantity, order name, steps run)``.
    """

    def __init__(self, module: nn.Module, backend: str = "torch", memory_cap: int = DEFAULT_MEMORY_CAP):
        if backend not in BACKENDS + ("auto",):
            raise TengradError(f"unknown backend {backend!r}; valid: {BACKENDS + ('auto',)}")
        self.module = module
        self.backend = backend
        self.memory_cap = memory_cap
        self.name = type(module).__name__
        self.terms: tuple[Term, ...]
        self.terms, self.params = match_terms(module, self.name)
        self.shapes = Shapes(module, self.name, self.terms)
        self.trace: list | None = None
        self._plans = LRU(PLANS_KEPT)
        self._last: ModulePlan | None = None
        self._bound: tuple | None = None  # (x, gy, versions, plan, runs) of the last call

    # ------------------------------------------------------------------ backend choice
    def planning_backend(self) -> Backend:
        """The backend plans are made for when no tensor says: 'auto' is triton where CUDA and
        triton are both present, else torch."""
        if self.backend != "auto":
            return backend_named(self.backend)
        if torch.cuda.is_available():
            try:
                return self._auto(backend_named("triton"))
            except TengradError:
                pass
        return backend_named("torch")

    def _auto(self, triton: Backend) -> Backend:
        """'auto' on CUDA: triton when it runs some order of every program of every term, else torch
        for this whole layer (e.g. a transposed convolution: triton has no output-map steps)."""
        for t in self.terms:
            for orders in enumerate_orders(t.spec).values():
                if not any(all(triton.supports(st) for st in o.steps) for o in orders):
                    return backend_named("torch")
        return triton

    def backend_for(self, gy: torch.Tensor) -> Backend:
        """The backend that runs tensors on ``gy``'s device: 'auto' runs triton for CUDA tensors only
        (even under TRITON_INTERPRET=1), 'triton' refuses CPU tensors outside the interpreter."""
        if self.backend == "torch":
            return backend_named("torch")
        if self.backend == "auto":
            if not gy.is_cuda:
                return backend_named("torch")
            try:
                return self._auto(backend_named("triton"))
            except TengradError:
                return backend_named("torch")
        chosen = backend_named("triton")
        if gy.is_cuda or _interpreting():
            return chosen
        raise TengradError(f"{self.name}: backend='triton' runs CUDA tensors (or any tensors under "
                           f"TRITON_INTERPRET=1); got a tensor on {gy.device}. Use backend='torch' or 'auto'.")

    # ------------------------------------------------------------------ planning
    @property
    def reads_ids(self) -> bool:
        """Whether the module input holds integer ids (a one-hot operand)."""
        return self.shapes.integer_ids

    def output_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return self.shapes.output(x)

    def orders(self, quantity: str) -> tuple[str, ...]:
        """The order names of ``quantity`` that the backend runs (union over terms)."""
        if quantity not in PROGRAMS:
            raise TengradError(f"unknown quantity {quantity!r}; valid: {PROGRAMS}")
        plan = self._last or self._plan_for_terms(None, backend=self.planning_backend())
        return plan.names(quantity)

    def _plan_for_terms(self, sizes_per_term, itemsize: int = 4, backend: Backend | None = None) -> ModulePlan:
        if sizes_per_term is None:  # size-free listing of orders
            sizes_per_term = [{i: 2 for i in (*t.spec.roles, *t.spec.out_map_of)} | dict(t.spec.sizes)
                              for t in self.terms]
        return ModulePlan(self.name, tuple(
            (t.param, SizedPlan(t.spec, tuple(s.items()), itemsize, self.memory_cap, backend=backend))
            for t, s in zip(self.terms, sizes_per_term)), getattr(backend, "name", "any"))

    def sized(self, x_shape, gy_shape, dtype: torch.dtype = torch.float32, backend: Backend | None = None) -> ModulePlan:
        """The plan at these sizes (cached): per term, every order's cost and the choice among the
        orders ``backend`` runs (default: ``planning_backend()``)."""
        backend = backend or self.planning_backend()
        key = (tuple(x_shape), tuple(gy_shape), dtype, backend.name)
        plan = self._plans.get(key)
        if plan is None:
            params = dict(self.params)
            sizes = [self.shapes.term_sizes(t, tuple(x_shape), tuple(gy_shape), tuple(params[t.param].shape))
                     for t in self.terms]
            itemsize = torch.empty((), dtype=dtype).element_size()
            plan = self._plans[key] = self._plan_for_terms(sizes, itemsize, backend)
        self._last = plan
        return self._last

    def source(self) -> str:
        """The generated Triton source of every term at the last planned sizes."""
        from ..codegen.triton import TritonTermRun

        if self._last is None:
            raise TengradError(f"{self.name}: no sizes planned yet; call sized(x_shape, gy_shape) first")
        parts = []
        for t, (_, sp) in zip(self.terms, self._last.terms):
            sizes = dict(sp.sizes)
            kind = kind_of(t.spec)
            g = torch.empty([sizes[i] for i in t.spec.output_indices], device="meta")
            x = None
            if kind.x_axes(t.spec) is not None:
                x = torch.empty([sizes[i] for i in kind.x_indices(t.spec)], device="meta",
                                dtype=torch.long if kind.integer_ids else torch.float32)
            parts.append(f"# ===== term {t.param}: {t.spec.describe()}\n" + TritonTermRun(t.spec, sizes, x, g).source())
        return "\n".join(parts)

    # ------------------------------------------------------------------ binding
    def _runs(self, x: torch.Tensor, gy: torch.Tensor):
        """The terms bound to (x, gy). The last binding is kept: the optimizer's reuse path calls
        gram, jvp and vjp on the same stored batch, which is then validated, pre-mapped and
        windowed once (a tensor modified in place since has a new version and is bound again)."""
        key = (x._version, gy._version, self.backend)
        if self._bound is not None and self._bound[0] is x and self._bound[1] is gy and self._bound[2] == key:
            return self._bound[3], self._bound[4]
        self.shapes.check(x, gy)
        backend = self.backend_for(gy)
        plan = self.sized(x.shape, gy.shape, gy.dtype, backend)
        runs = []
        for t, (_, sp) in zip(self.terms, plan.terms):
            sizes = dict(sp.sizes)
            runs.append((backend.bind(t.spec, sizes, *self.shapes.bind(t, sizes, x, gy)), sp))
        self._bound = (x, gy, key, plan, runs)
        return plan, runs

    def unbind(self) -> None:
        """Forget the last binding (``_runs``): its x, gy and what was derived from them (a conv's
        windowed copy of x) are freed with their last other reference. The optimizer calls it once a
        block keeps its explicit Jacobian instead of x and gy (optim/estimator/local.py)."""
        self._bound = None

    def _execute(self, param: str, run, order: Order, **inputs) -> torch.Tensor:
        if self.trace is None:
            return run.execute(order, **inputs)
        run.trace = []
        try:
            return run.execute(order, **inputs)
        finally:
            self.trace.append((param, order.quantity, order.name, tuple(run.trace)))
            run.trace = None

    def _check_like_params(self, p: Sequence[torch.Tensor], what: str, gy: torch.Tensor) -> list[torch.Tensor]:
        if isinstance(p, torch.Tensor) or len(p) != len(self.params):
            raise ShapeError(f"{self.name}: {what} must be a sequence of {len(self.params)} tensors shaped like "
                             f"{[tuple(q.shape) for _, q in self.params]}")
        for (name, q), t in zip(self.params, p):
            if tuple(t.shape) != tuple(q.shape):
                raise ShapeError(f"{self.name}: {what} for {name} has shape {tuple(t.shape)}, expected {tuple(q.shape)}")
        return [t.to(gy.dtype) for t in p]

    # ------------------------------------------------------------------ the quantities
    def gram(self, x: torch.Tensor, gy: torch.Tensor, order: str | None = None) -> torch.Tensor:
        """K = J J^T, [m, m]."""
        check_call(self, "gram", x, gy, order=order)
        plan, runs = self._runs(x, gy)
        plan.check("gram", order)
        return sum(self._execute(t.param, r, plan.term_order(sp, "gram", order)) for t, (r, sp) in zip(self.terms, runs))

    def jvp(self, x, gy, p: Sequence[torch.Tensor], order: str | None = None) -> torch.Tensor:
        """J p, [m]; ``p`` shaped like ``self.params``."""
        check_call(self, "jvp", x, gy, order=order, p=p)
        p = self._check_like_params(p, "p", gy)
        plan, runs = self._runs(x, gy)
        plan.check("jvp", order)
        return sum(self._execute(t.param, r, plan.term_order(sp, "jvp", order), p=pt)
                   for t, (r, sp), pt in zip(self.terms, runs, p))

    def vjp(self, x, gy, u: torch.Tensor, order: str | None = None) -> tuple[torch.Tensor, ...]:
        """J^T u, a tuple shaped like ``self.params``; ``u``: [m]."""
        check_call(self, "vjp", x, gy, order=order, u=u)
        if not isinstance(u, torch.Tensor) or tuple(u.shape) != (gy.shape[0],):
            raise ShapeError(f"{self.name}: u must have shape ({gy.shape[0]},), got "
                             f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
        plan, runs = self._runs(x, gy)
        plan.check("vjp", order)
        u = u.to(gy.dtype)
        return tuple(self._execute(name, r, plan.term_order(sp, "vjp", order), u=u).reshape(q.shape)
                     for (r, sp), (name, q) in zip(runs, self.params))

    def vjp_magnitudes(self, x, gy, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """|J|^T u for u >= 0 [m]: ``vjp`` with every term's (pre-mapped) input and output gradient by
        magnitude, so each entry is the sum of the magnitudes of the products whose signed sum J^T u
        adds (the scale of that sum's rounding: the optimizer's consistency.cancelled). Not kept as the
        last binding (``_runs``)."""
        check_call(self, "vjp", x, gy, u=u)
        if tuple(u.shape) != (gy.shape[0],):
            raise ShapeError(f"{self.name}: u must have shape ({gy.shape[0]},), got {tuple(u.shape)}")
        self.shapes.check(x, gy)
        backend = self.backend_for(gy)
        plan = self.sized(x.shape, gy.shape, gy.dtype, backend)
        u = u.to(gy.dtype)
        out = []
        for t, (_, sp), (name, q) in zip(self.terms, plan.terms, self.params):
            sizes = dict(sp.sizes)
            run = backend.bind(t.spec, sizes, *self.shapes.bind(t, sizes, x, gy, magnitudes=True))
            out.append(self._execute(name, run, plan.term_order(sp, "vjp", None), u=u).reshape(q.shape))
        return tuple(out)

    def bound(self, x: torch.Tensor, gy: torch.Tensor) -> "BoundLayer":
        """jvp and vjp on one stored batch (x, gy), checked and planned once: the optimizer's reuse
        steps call them every step on the same kept rows, where the per-call checks of ``jvp`` and
        ``vjp`` cost more than a small block's contraction."""
        check_call(self, "gram", x, gy)      # x and gy alone (the quantities' own arguments come later)
        plan, runs = self._runs(x, gy)
        return BoundLayer(self, gy.dtype, [(r, plan.term_order(sp, "jvp", None), plan.term_order(sp, "vjp", None))
                                            for r, sp in runs])

    def jacobian(self, x, gy) -> tuple[torch.Tensor, ...]:
        """Per-sample gradients, a tuple of [m, *param.shape]."""
        check_call(self, "jacobian", x, gy)
        plan, runs = self._runs(x, gy)
        m = gy.shape[0]
        return tuple(self._execute(name, r, sp.chosen("jacobian")).reshape(m, *q.shape)
                     for (r, sp), (name, q) in zip(runs, self.params))

    def __repr__(self) -> str:
        head = f"CompiledLayer({self.module}, backend={self.backend!r})"
        if self._last is None:
            return head + "\n  (no sizes yet: call gram/jvp/vjp or sized(x_shape, gy_shape) to plan)\n" + \
                "\n".join(f"  term {t.param}: {t.spec.describe()}\n    roles {t.spec.roles_line()}" for t in self.terms)
        return head + "\n" + repr(self._last)


class BoundLayer:
    """A layer's terms bound to one (x, gy), their jvp and vjp orders looked up once (``CompiledLayer.bound``).

    ``jvp(p)``: J p [m] for p shaped like the layer's parameters; ``vjp(u)``: J^T u, a tuple shaped like
    them, for u [m]. The same steps as ``CompiledLayer.jvp/vjp`` with their chosen orders (no order
    argument, no per-call checks of x and gy: they were checked when bound)."""

    __slots__ = ("layer", "dtype", "terms", "shapes")

    def __init__(self, layer: CompiledLayer, dtype: torch.dtype, terms: list) -> None:
        self.layer, self.dtype, self.terms = layer, dtype, terms
        self.shapes = [q.shape for _, q in layer.params]

    def jvp(self, p: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(p) != len(self.shapes) or any(t.shape != s for t, s in zip(p, self.shapes)):
            self.layer._check_like_params(p, "p", torch.empty(0, dtype=self.dtype))
        out = None
        for (run, order, _), (name, _), t in zip(self.terms, self.layer.params, p):
            y = self.layer._execute(name, run, order, p=t.to(self.dtype))
            out = y if out is None else out + y
        return out

    def vjp(self, u: torch.Tensor, add: Sequence[torch.Tensor] | None = None, beta: float = 1.0,
            out: Sequence[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, ...]:
        """J^T u; with ``add`` (tensors shaped like the parameters): J^T u + beta * add, the sum formed
        in the last product where it is one matrix product (a Linear's weight: one addmm), written into
        ``out`` (buffers shaped like the parameters, None for a fresh tensor) when given."""
        u = u.to(self.dtype)
        n = len(self.terms)
        outs = [None] * n if out is None else out
        adds = [None] * n if add is None else [Add(c.to(self.dtype), beta, o) for c, o in zip(add, outs)]
        return tuple(self.layer._execute(name, run, order, u=u, add=a).reshape(shape)
                     for (run, _, order), (name, _), shape, a in zip(self.terms, self.layer.params, self.shapes, adds))
