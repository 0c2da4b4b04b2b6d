"""``ModulePlan``: the sized plans (``tengrad_ir.SizedPlan``) of a module's terms for one backend.

A module's parameters form one block, so its quantities sum (or stack) over its terms. An ``order``
asked for by name applies to every term that has it among the orders its backend runs; the other
terms (a bias has no ``factored_raw``) use their own choice. A name no term can run is an error.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from tengrad_ir import PROGRAMS, QUANTITIES, Order, SizedPlan
from tengrad_ir.plan import Cost

from ..errors import TengradError


@dataclass(frozen=True)
class ModulePlan:
    """``choice[q]`` is the choice of the costliest term."""

    module_name: str
    terms: tuple[tuple[str, SizedPlan], ...]
    backend: str = "torch"

    def _main(self, quantity: str) -> SizedPlan:
        return max((p for _, p in self.terms), key=lambda p: p.cost(quantity).flops)

    @property
    def choice(self) -> dict[str, str]:
        return {q: self._main(q).choice[q] for q in QUANTITIES}

    @cached_property
    def _names(self) -> dict[str, tuple[str, ...]]:
        return {q: tuple(dict.fromkeys(o.name for _, p in self.terms for o in p.runnable(q))) for q in PROGRAMS}

    def names(self, quantity: str) -> tuple[str, ...]:
        """The order names any term can run, in the IR's order."""
        if quantity not in PROGRAMS:
            raise TengradError(f"unknown quantity {quantity!r}; valid: {PROGRAMS}")
        return self._names[quantity]

    def check(self, quantity: str, order: str | None) -> None:
        if order is not None and order not in self.names(quantity):
            raise TengradError(f"{self.module_name}: no {quantity} order {order!r} on the {self.backend} backend; "
                               f"valid: {list(self.names(quantity))}")

    def term_order(self, plan: SizedPlan, quantity: str, order: str | None) -> Order:
        """The order a term runs: ``order`` where the term's backend runs it, else the term's choice."""
        if order is not None:
            for o in plan.runnable(quantity):
                if o.name == order:
                    return o
        return plan.chosen(quantity)

    def cost(self, quantity: str, order: str | None = None) -> Cost:
        """Total cost over terms of ``order`` (terms without it: their choice; None: the choice)."""
        self.check(quantity, order)
        costs = [p.cost(quantity, self.term_order(p, quantity, order).name) for _, p in self.terms]
        return Cost(sum(c.flops for c in costs), sum(c.memory for c in costs))

    def __repr__(self) -> str:
        return "\n".join([f"tengrad plan for {self.module_name} (backend {self.backend})"]
                         + [repr(p) for _, p in self.terms])
