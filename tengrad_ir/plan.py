"""Plans for concrete sizes: evaluate every order's closed-form cost and choose the cheapest.

The choice per quantity is made among the orders the backend runs (every step of the order is one
the backend supports; no backend given: every order): the one with the fewest FLOPs among those
whose peak extra memory fits ``memory_cap`` bytes (equal FLOPs: the one with less memory); when none
fits, the one with the least memory (and the plan says so). ``repr(plan)`` reads like opt_einsum's
``PathInfo``: the backend, every order's cost and steps, and what the backend runs for each step.

A backend here is anything with ``name``, ``supports(step) -> bool`` and ``describe(step, classes) -> str``
(``tengrad.codegen.backend.Backend``); the IR never imports one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import sympy

from .errors import SpecError
from .orders import (N_C, N_O, N_Cu, N_I, N_Ir, N_K, N_P, N_Vr, N_g, N_v, PROGRAMS, Order, enumerate_orders, m)
from .spec import LayerSpec

DEFAULT_MEMORY_CAP = 4 * 2**30  # bytes


@dataclass(frozen=True)
class Cost:
    flops: int
    memory: int  # elements

    def __str__(self) -> str:
        return f"{self.flops:.3e} flop  {self.memory:.3e} el"


def class_sizes(spec: LayerSpec, sizes: dict[str, int]) -> dict[sympy.Symbol, int]:
    """Role-class sizes ``{m, N_g, N_v, N_I, N_C, N_Ir, N_K, N_P, N_Cu, N_Vr, N_O}`` from index sizes.

    With output maps (``spec.out_maps``) the kernel indices ``N_K`` are free, ``N_P`` counts the
    output positions the maps read, ``N_Vr`` is the free size outside the maps and ``N_O`` the
    mapped output positions (both 1-or-N_v-valued and unused without output maps)."""
    missing = [i for i in spec.roles if i not in sizes]
    missing += [mp.target for mp in spec.out_maps if mp.target not in sizes]
    if missing:
        raise SpecError(f"{spec.name}: no size for index {missing[0]!r}")
    prod = lambda idx: math.prod(sizes[i] for i in idx)  # noqa: E731
    maps = spec.maps + spec.out_maps
    mapped_vars = {v for mp in maps for v in mp.variables}
    read = 1  # raw positions the maps read inside [0, N): R is computed there, padding is free
    for mp in maps:
        low, high = mp.extent(sizes)
        read *= max(0, min(high, sizes[mp.target] - 1) - max(low, 0) + 1)
    return {
        m: sizes[spec.batch], N_g: prod(spec.indices("group")), N_v: prod(spec.indices("free")),
        N_I: prod(spec.indices("independent")), N_C: prod(spec.indices("common")),
        N_Ir: prod(i for i in spec.indices("independent") if i not in mapped_vars),
        N_K: prod(i for i in spec.indices("independent") + spec.indices("free") if i in mapped_vars),
        N_Cu: prod(i for i in spec.indices("common") if i not in mapped_vars),
        N_P: max(read, 1),
        N_Vr: prod(i for i in spec.indices("free") if i not in mapped_vars),
        N_O: prod(mp.target for mp in spec.out_maps),
    }


@dataclass(frozen=True)
class SizedPlan:
    """One term's orders evaluated at concrete sizes, and the choice per quantity."""

    spec: LayerSpec
    sizes: tuple[tuple[str, int], ...]
    itemsize: int = 4
    memory_cap: int = DEFAULT_MEMORY_CAP
    orders: dict = field(default=None, compare=False, hash=False)  # type: ignore[assignment]
    backend: object = field(default=None, compare=False, hash=False)

    def __post_init__(self):
        if self.orders is None:
            object.__setattr__(self, "orders", enumerate_orders(self.spec))

    @cached_property
    def values(self) -> dict[sympy.Symbol, int]:
        return class_sizes(self.spec, dict(self.sizes))

    @property
    def classes(self) -> dict[str, int]:
        """The class sizes by name (``{"m": 128, "N_g": 1, ...}``), what ``backend.describe`` may read."""
        return {str(k): int(v) for k, v in self.values.items()}

    @property
    def backend_name(self) -> str:
        return getattr(self.backend, "name", "any")

    def missing(self, o: Order) -> list[str]:
        """The steps of ``o`` that the backend does not run (empty: it runs the order)."""
        if self.backend is None:
            return []
        return [f"{s.op} -> {s.out.name}" for s in o.steps if not self.backend.supports(s)]

    @cached_property
    def _runnable(self) -> dict[str, tuple[Order, ...]]:
        return {q: tuple(o for o in orders if not self.missing(o)) for q, orders in self.orders.items()}

    def runnable(self, quantity: str) -> tuple[Order, ...]:
        """The orders of ``quantity`` whose every step the backend supports."""
        out = self._runnable[quantity]
        if not out:
            raise SpecError(f"{self.spec.name}: the {self.backend_name} backend runs no {quantity} order "
                            f"(it lacks {sorted({x for o in self.orders[quantity] for x in self.missing(o)})})")
        return out

    def order(self, quantity: str, name: str) -> Order:
        if quantity not in self.orders:
            raise SpecError(f"{self.spec.name}: unknown quantity {quantity!r}; valid: {list(self.orders)}")
        for o in self.orders[quantity]:
            if o.name == name:
                return o
        raise SpecError(f"{self.spec.name}: no {quantity} order {name!r}; valid: "
                        f"{[o.name for o in self.orders[quantity]]}")

    def cost(self, quantity: str, name: str | None = None) -> Cost:
        """The cost of order ``name`` (None: the chosen one)."""
        return self._cost(self.order(quantity, self.choice[quantity] if name is None else name))

    def fits(self, cost: Cost) -> bool:
        return cost.memory * self.itemsize <= self.memory_cap

    @cached_property
    def choice(self) -> dict[str, str]:
        out = {}
        for q in PROGRAMS:
            costs = {o.name: self._cost(o) for o in self.runnable(q)}
            fitting = [n for n, c in costs.items() if self.fits(c)]
            pool = fitting or [min(costs, key=lambda n: costs[n].memory)]
            out[q] = min(pool, key=lambda n: (costs[n].flops, costs[n].memory))
        return out

    @cached_property
    def _costs(self) -> dict[int, Cost]:
        """Every order's cost at these sizes, evaluated once through the order's compiled cost
        functions (cost_fn.py: no sympy substitution per plan)."""
        values = self.values
        out = {}
        for orders in self.orders.values():
            for o in orders:
                flops, memory = o.cost_fns
                out[id(o)] = Cost(flops(values), memory(values))
        return out

    def _cost(self, o: Order) -> Cost:
        return self._costs[id(o)]

    def chosen(self, quantity: str) -> Order:
        return self.order(quantity, self.choice[quantity])

    def reason(self, quantity: str) -> str:
        costs = {o.name: self._cost(o) for o in self.runnable(quantity)}
        chosen = self.choice[quantity]
        over = [n for n, c in costs.items() if not self.fits(c)]
        if not self.fits(costs[chosen]):
            return f"{chosen}: no order fits the memory cap ({self.memory_cap / 2**30:.1f} GiB); least memory"
        others = [c.flops for n, c in costs.items() if n != chosen and n not in over]
        ratio = f", {min(others) / max(costs[chosen].flops, 1):.1f}x fewer flops than the next" if others else ""
        capped = f"; over the memory cap: {', '.join(over)}" if over else ""
        return f"{chosen}: cheapest that fits the memory cap{ratio}{capped}"

    def __repr__(self) -> str:
        s = self.spec
        vals = self.values
        lines = [f"term {s.name}:  {s.describe()}",
                 f"  roles   {s.roles_line()}",
                 "  sizes   " + "  ".join(f"{k}={v}" for k, v in self.sizes),
                 "  classes " + "  ".join(f"{k}={vals[k]}" for k in (m, N_g, N_v, N_I, N_C)),
                 f"  backend {self.backend_name}"]
        describe = getattr(self.backend, "describe", None)
        classes = self.classes
        for q in PROGRAMS:
            lines.append(f"  {q}:")
            for o in self.orders[q]:
                c = self._cost(o)
                missing = self.missing(o)
                mark = "*" if self.choice[q] == o.name else ("x" if missing else " ")
                lines.append(f"   {mark} {o.name:<13} {c.flops:>11.3e} flop {c.memory * self.itemsize / 2**20:>10.1f} MiB"
                             f"   = {o.formula}")
                if missing:
                    lines.append(f"        (not run: the {self.backend_name} backend has no step {', '.join(missing)})")
                for step in o.steps:
                    lines.append(f"        {step}")
                    if describe is not None and not missing:
                        lines.append(f"            -> {describe(step, classes)}")
            lines.append(f"    chosen {self.reason(q)}")
        return "\n".join(lines)
