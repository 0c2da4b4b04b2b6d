"""``tengrad.compile(module)``: a module's terms, planned per size and run by a backend.

J is the m x p matrix whose row i is the gradient of ``<gy[i], module(x)[i]>`` w.r.t. the module's
trainable parameters (in ``module.parameters()`` order). A module's parameters form one block, so

    K = sum_terms K_term,  J p = sum_terms J_term p_term,  J^T u = (J_term^T u for each term).

An ``order`` passed to gram/jvp/vjp applies to every term that has it; other terms (a bias has no
``factored_raw``) use their own choice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from tengrad_ir import DEFAULT_MEMORY_CAP, SizedPlan
from tengrad_ir.orders import QUANTITIES
from tengrad_ir.plan import Cost

from .binding import bind_sizes, to_indexed
from .checks import check_call
from .codegen.torch_backend import TermRun
from .errors import ShapeError, TengradError
from .layers import factory_for
from .layers.term import Term

BACKENDS = ("torch", "triton", "auto")


@dataclass(frozen=True)
class ModulePlan:
    """The sized plans of a module's terms; ``choice[q]`` is the choice of the costliest term."""

    module_name: str
    terms: tuple[tuple[str, SizedPlan], ...]

    def _main(self, quantity: str) -> SizedPlan:
        return max((p for _, p in self.terms), key=lambda p: p.cost(quantity, p.choice[quantity]).flops)

    @property
    def choice(self) -> dict[str, str]:
        return {q: self._main(q).choice[q] for q in QUANTITIES}

    def term_order(self, plan: SizedPlan, quantity: str, order: str | None) -> str:
        names = [o.name for o in plan.orders[quantity]]
        return order if order in names else plan.choice[quantity]

    def cost(self, quantity: str, order: str | None = None) -> Cost:
        """Total cost over terms of ``order`` (terms without it: their choice; None: the choice)."""
        costs = [p.cost(quantity, self.term_order(p, quantity, order)) for _, p in self.terms]
        return Cost(sum(c.flops for c in costs), sum(c.memory for c in costs))

    def __repr__(self) -> str:
        return "\n".join([f"tengrad plan for {self.module_name}"] + [repr(p) for _, p in self.terms])


class CompiledLayer:
    """The compiled per-layer quantities of one module (see module docstring)."""

    def __init__(self, module: nn.Module, backend: str = "torch", memory_cap: int = DEFAULT_MEMORY_CAP):
        if backend not in BACKENDS:
            raise TengradError(f"unknown backend {backend!r}; valid: {BACKENDS}")
        self.module = module
        self.backend = backend
        self.memory_cap = memory_cap
        self.name = type(module).__name__
        terms = {t.param: t for t in factory_for(module)(module)}
        params = dict(module.named_parameters(recurse=False))
        unknown = [t for t in terms if t not in params]
        if unknown:
            raise TengradError(f"{self.name}: spec term {unknown[0]!r} names no parameter of the module")
        self.terms: tuple[Term, ...] = tuple(terms[name] for name, p in params.items()
                                             if p.requires_grad and name in terms)
        missing = [name for name, p in params.items() if p.requires_grad and name not in terms]
        if missing:
            raise TengradError(f"{self.name}: trainable parameter {missing[0]!r} has no spec term")
        if not self.terms:
            raise TengradError(f"{self.name}: no trainable parameters to precondition")
        self.params = tuple((t.param, params[t.param]) for t in self.terms)
        self._plans: dict = {}
        self._out_shapes: dict = {}
        self._last: ModulePlan | None = None
        self._bound: tuple | None = None  # (x, gy, versions, plan, runs) of the last call

    # ------------------------------------------------------------------ planning
    def orders(self, quantity: str) -> tuple[str, ...]:
        if quantity not in QUANTITIES:
            raise TengradError(f"unknown quantity {quantity!r}; valid: {QUANTITIES}")
        plan = self._last or self._plan_for_terms(None)
        return tuple(dict.fromkeys(o.name for _, p in plan.terms for o in p.orders[quantity]))

    def _plan_for_terms(self, sizes_per_term, itemsize: int = 4) -> ModulePlan:
        if sizes_per_term is None:  # size-free listing of orders
            sizes_per_term = [{i: 2 for i in t.spec.roles} | dict(t.spec.sizes) for t in self.terms]
        return ModulePlan(self.name, tuple(
            (t.param, SizedPlan(t.spec, tuple(s.items()), itemsize, self.memory_cap))
            for t, s in zip(self.terms, sizes_per_term)))

    def _expected_output_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        key = (tuple(x.shape), x.dtype)
        if key not in self._out_shapes:
            # floating tensors on meta in x's dtype (bf16 parameters meet the float32-upcast x);
            # integer buffers (BatchNorm's num_batches_tracked, read by momentum=None) as real copies
            dt = x.dtype if x.is_floating_point() else None
            meta = {k: v.to("meta", dtype=dt) if v.is_floating_point() else v.clone()
                    for k, v in [*self.module.named_parameters(recurse=False),
                                 *self.module.named_buffers(recurse=False)]}
            try:
                with torch.no_grad():
                    y = torch.func.functional_call(self.module, meta, (x.to("meta"),))
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                raise ShapeError(f"{self.name}: input of shape {tuple(x.shape)} is not valid for "
                                 f"{self.module}: {exc}") from None
            self._out_shapes[key] = tuple(y.shape)
        return self._out_shapes[key]

    def _term_sizes(self, term: Term, x_shape, y_shape, param_shape) -> dict[str, int]:
        s = term.spec
        ops = [(s.output_axes, y_shape, f"{self.name} output gradient"),
               (s.param_axes, param_shape, f"{self.name}.{term.param}")]
        if s.source == "input":
            ops.append((s.input_axes, x_shape, f"{self.name} input (after pre-map)"))
        elif s.source == "one_hot":
            ops.append((s.input_axes[:-1], x_shape, f"{self.name} input ids"))
        sizes = bind_sizes(s, ops)
        if s.source == "one_hot":
            sizes[s.one_hot] = param_shape[s.param_indices.index(s.one_hot)]
        return sizes

    def sized(self, x_shape, gy_shape, dtype: torch.dtype = torch.float32) -> ModulePlan:
        """The plan at these sizes (cached): per term, every order's cost and the choice."""
        key = (tuple(x_shape), tuple(gy_shape), dtype)
        if key not in self._plans:
            sizes = []
            for t in self.terms:
                pre_shape = x_shape
                if t.pre_map is not None and t.spec.source == "input":
                    pre_shape = tuple(t.pre_map(torch.empty(x_shape, device="meta")).shape)
                sizes.append(self._term_sizes(t, tuple(pre_shape), tuple(gy_shape),
                                              tuple(dict(self.params)[t.param].shape)))
            itemsize = torch.empty((), dtype=dtype).element_size()
            self._plans[key] = self._plan_for_terms(sizes, itemsize)
        self._last = self._plans[key]
        return self._last

    # ------------------------------------------------------------------ binding
    def _check(self, x: torch.Tensor, gy: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not isinstance(gy, torch.Tensor):
            raise ShapeError(f"{self.name}: x and gy must be tensors")
        if not gy.is_floating_point():
            raise ShapeError(f"{self.name}: gy must be floating point, got {gy.dtype}")
        ids = isinstance(self.module, nn.Embedding)
        if ids and x.dtype not in (torch.int64, torch.int32):
            raise ShapeError(f"{self.name}: input must hold integer ids, got {x.dtype}")
        if not ids and x.dtype != gy.dtype:
            raise ShapeError(f"{self.name}: x has dtype {x.dtype} but gy has {gy.dtype}; pass both in one dtype")
        if x.dim() == 0 or gy.dim() == 0 or x.shape[0] != gy.shape[0]:
            raise ShapeError(f"{self.name}: x {tuple(x.shape)} and gy {tuple(gy.shape)} need the same "
                             "leading batch dimension")
        expected = self._expected_output_shape(x)
        if tuple(gy.shape) != expected:
            raise ShapeError(f"{self.name}: gy has shape {tuple(gy.shape)}, expected {expected} "
                             f"(the shape of module(x) for x of shape {tuple(x.shape)})")

    def _run_class(self, gy: torch.Tensor):
        """TermRun (torch) or TritonTermRun, per ``backend`` and the tensors' device."""
        if self.backend == "torch":
            return TermRun
        try:
            from .codegen.triton import TritonTermRun
            from .codegen.triton.run import interpreting
        except ImportError as exc:
            if self.backend == "auto":
                return TermRun
            raise TengradError(f"{self.name}: backend='triton' needs the triton package "
                               f"(pip install 'tengrad[triton]'): {exc}") from None
        if gy.is_cuda or (self.backend == "triton" and interpreting()):
            return TritonTermRun
        if self.backend == "auto":  # triton for CUDA tensors only, even under TRITON_INTERPRET=1
            return TermRun
        raise TengradError(f"{self.name}: backend='triton' runs CUDA tensors (or any tensors under "
                           f"TRITON_INTERPRET=1); got a tensor on {gy.device}. Use backend='torch' or 'auto'.")

    def source(self) -> str:
        """The generated Triton source of every term at the last planned sizes."""
        from .codegen.triton import TritonTermRun

        if self._last is None:
            raise TengradError(f"{self.name}: no sizes planned yet; call sized(x_shape, gy_shape) first")
        parts = []
        for t, (_, sp) in zip(self.terms, self._last.terms):
            sizes = dict(sp.sizes)
            g = torch.empty([sizes[i] for i in t.spec.output_indices], device="meta")
            x = None
            if t.spec.source != "ones":
                raw = [i for i in t.spec.raw_input_indices if i != t.spec.one_hot]
                x = torch.empty([sizes[i] for i in raw], device="meta",
                                dtype=torch.long if t.spec.source == "one_hot" else torch.float32)
            parts.append(f"# ===== term {t.param}: {t.spec.describe()}\n" + TritonTermRun(t.spec, sizes, x, g).source())
        return "\n".join(parts)

    def _runs(self, x: torch.Tensor, gy: torch.Tensor):
        """The terms bound to (x, gy). The last binding is kept: the optimizer's reuse path calls
        gram, jvp and vjp on the same stored batch, which is then validated, pre-mapped and
        windowed once (a tensor modified in place since has a new version and is bound again)."""
        key = (x._version, gy._version, self.backend)
        if self._bound is not None and self._bound[0] is x and self._bound[1] is gy and self._bound[2] == key:
            return self._bound[3], self._bound[4]
        self._check(x, gy)
        run_class = self._run_class(gy)
        plan = self.sized(x.shape, gy.shape, gy.dtype)
        runs = []
        for t, (_, sp) in zip(self.terms, plan.terms):
            sizes = dict(sp.sizes)
            xt = None
            if t.spec.source != "ones":
                xt = t.pre_map(x) if t.pre_map is not None else x
                axes = t.spec.input_axes[:-1] if t.spec.source == "one_hot" else t.spec.input_axes
                xt = to_indexed(xt, axes, sizes, f"{self.name} input")
            g = to_indexed(gy, t.spec.output_axes, sizes, f"{self.name} output gradient")
            runs.append((run_class(t.spec, sizes, xt, g), sp))
        self._bound = (x, gy, key, plan, runs)
        return plan, runs

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
        return sum(r.gram(plan.term_order(sp, "gram", order)) for r, sp in runs)

    def jvp(self, x, gy, p: Sequence[torch.Tensor], order: str | None = None) -> torch.Tensor:
        """J p, [m]; ``p`` shaped like ``self.params``."""
        check_call(self, "jvp", x, gy, order=order, p=p)
        p = self._check_like_params(p, "p", gy)
        plan, runs = self._runs(x, gy)
        return sum(r.jvp(pt, plan.term_order(sp, "jvp", order)) for (r, sp), pt in zip(runs, p))

    def vjp(self, x, gy, u: torch.Tensor, order: str | None = None) -> tuple[torch.Tensor, ...]:
        """J^T u, a tuple shaped like ``self.params``; ``u``: [m]."""
        check_call(self, "vjp", x, gy, order=order, u=u)
        if not isinstance(u, torch.Tensor) or tuple(u.shape) != (gy.shape[0],):
            raise ShapeError(f"{self.name}: u must have shape ({gy.shape[0]},), got "
                             f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
        plan, runs = self._runs(x, gy)
        u = u.to(gy.dtype)
        return tuple(r.vjp(u, plan.term_order(sp, "vjp", order)).reshape(q.shape)
                     for (r, sp), (_, q) in zip(runs, self.params))

    def jacobian(self, x, gy) -> tuple[torch.Tensor, ...]:
        """Per-sample gradients, a tuple of [m, *param.shape]."""
        check_call(self, "jacobian", x, gy)
        _, runs = self._runs(x, gy)
        m = gy.shape[0]
        return tuple(r.jacobian().reshape(m, *q.shape) for (r, _), (_, q) in zip(runs, self.params))

    def __repr__(self) -> str:
        head = f"CompiledLayer({self.module}, backend={self.backend!r})"
        if self._last is None:
            return head + "\n  (no sizes yet: call gram/jvp/vjp or sized(x_shape, gy_shape) to plan)\n" + \
                "\n".join(f"  term {t.param}: {t.spec.describe()}\n    roles {t.spec.roles_line()}" for t in self.terms)
        return head + "\n" + repr(self._last)
