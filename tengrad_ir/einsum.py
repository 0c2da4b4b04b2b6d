"""An immutable einsum node and its FLOP count, the way opt_einsum counts it.

opt_einsum (``helpers.flop_count``) charges a contraction ``prod(sizes of all its indices) * f`` with
``f = max(1, terms - 1) + (1 if some index is summed else 0)``: 2 per multiply-add of a pairwise
contraction, 1 per element of an outer or Hadamard product. The same rule in sympy gives closed
forms that equal opt_einsum's count at any concrete sizes (a test checks it).
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy


@dataclass(frozen=True)
class Tensor:
    """A named operand: ``name[i, j, ...]``."""

    name: str
    indices: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.name}[{','.join(self.indices)}]"


@dataclass(frozen=True)
class Einsum:
    """``out = sum over the indices not in out of prod(operands)``."""

    operands: tuple[Tensor, ...]
    out: Tensor

    @property
    def summed(self) -> tuple[str, ...]:
        seen = dict.fromkeys(i for t in self.operands for i in t.indices)
        return tuple(i for i in seen if i not in self.out.indices)

    @property
    def all_indices(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(i for t in (*self.operands, self.out) for i in t.indices))

    def flops(self, size) -> sympy.Expr:
        """opt_einsum's FLOP count, with ``size(index)`` giving each index's sympy size."""
        factor = max(1, len(self.operands) - 1) + (1 if self.summed else 0)
        return factor * sympy.Mul(*[size(i) for i in self.all_indices])

    def out_size(self, size) -> sympy.Expr:
        return sympy.Mul(*[size(i) for i in self.out.indices])

    def letters(self) -> str:
        """The equation in single letters, e.g. ``"ab,bc->ac"`` (for opt_einsum and torch)."""
        table = {i: chr(ord("a") + k) if k < 26 else chr(ord("A") + k - 26)
                 for k, i in enumerate(self.all_indices)}
        lhs = ",".join("".join(table[i] for i in t.indices) for t in self.operands)
        return lhs + "->" + "".join(table[i] for i in self.out.indices)

    def __str__(self) -> str:
        sums = f"sum_{{{','.join(self.summed)}}} " if self.summed else ""
        return f"{self.out} = {sums}{' '.join(str(t) for t in self.operands)}"
