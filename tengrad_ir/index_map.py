"""Affine index maps of unfolding, e.g. ``ih = sh*oh + dh*kh - ph`` (the conv2d example of spec.py).

An input index that is not a tensor dimension of the unfolded input is given as an affine
function of the indices that are: ``ih = s*oh + d*kh + c``. Positions outside ``[0, N_ih)`` read
zero (zero padding). Coefficients must be positive integers so that the unfolded input is a
strided view of the (padded) input; the offset is any integer.

A map string is read by ``affine.parse`` (names, integers, +, -, *, parentheses) and never
evaluated: sympy only receives the parsed tree (``affine.to_sympy``), never the string.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import sympy

from . import affine
from .affine import to_sympy
from .errors import SpecError


def _constants(constants: object, target: str) -> dict[str, int]:
    """``{name: int}`` (bool is not an integer); anything else is a SpecError naming the map."""
    if constants is None:
        return {}
    if not isinstance(constants, dict):
        raise SpecError(f"index map for {target!r}: constants must be a dict of name -> int, "
                        f"got {type(constants).__name__}")
    for k, v in constants.items():
        if not isinstance(k, str) or not isinstance(v, int) or isinstance(v, bool):
            raise SpecError(f"index map for {target!r}: constant {k!r} must be an int, got {v!r}")
    return dict(constants)


@dataclass(frozen=True)
class IndexMap:
    """``target = sum_k coeffs[k] * k + offset`` over indices ``k``."""

    target: str
    expr: sympy.Expr

    @staticmethod
    def parse(target: str, text: str | sympy.Expr, indices: set[str],
              constants: dict[str, int] | None = None) -> "IndexMap":
        constants = _constants(constants, target)
        where = f"index map {target} = {text}"
        if isinstance(text, str):
            try:                                    # never sympify a string: it would evaluate it
                expr = to_sympy(affine.parse(text))
            except SpecError as exc:
                raise SpecError(f"{where[:120]}: {exc}") from None
        elif isinstance(text, sympy.Expr):
            expr = text
        elif isinstance(text, int) and not isinstance(text, bool):
            expr = sympy.Integer(text)
        else:
            raise SpecError(f"index map for {target!r} must be a string or a sympy expression, "
                            f"got {type(text).__name__}")
        unknown = sorted(str(s) for s in expr.free_symbols if str(s) not in indices | set(constants))
        if unknown:
            raise SpecError(f"{where}: unknown symbol {unknown[0]!r} (neither an index of the spec"
                            f" nor a given constant; constants: {sorted(constants) or 'none'})")
        expr = sympy.expand(expr.subs({sympy.Symbol(k, integer=True): v for k, v in constants.items()}
                                      ).subs({sympy.Symbol(k): v for k, v in constants.items()}))
        variables = sorted(expr.free_symbols, key=str)
        if variables:
            try:
                poly = sympy.Poly(expr, *variables)
            except sympy.PolynomialError:
                raise SpecError(f"{where}: not affine in the indices") from None
            if poly.total_degree() > 1:
                raise SpecError(f"{where}: not affine in the indices (degree {poly.total_degree()})")
        for var in variables:
            coeff = expr.coeff(var)
            if not (coeff.is_Integer and coeff > 0):
                raise SpecError(f"{where}: coefficient of {var} must be a positive integer, got {coeff}")
        offset = expr.subs({v: 0 for v in variables})
        if not offset.is_Integer:
            raise SpecError(f"{where}: offset must be an integer, got {offset}")
        canonical = sympy.Add(*[expr.coeff(v) * sympy.Symbol(str(v), integer=True) for v in variables],
                              offset)
        return IndexMap(target, canonical)

    # Plain integers, computed once: the hot path never touches sympy.
    @cached_property
    def coeffs(self) -> dict[str, int]:
        return {str(v): int(self.expr.coeff(v)) for v in sorted(self.expr.free_symbols, key=str)}

    @cached_property
    def offset(self) -> int:
        return int(self.expr.subs({v: 0 for v in self.expr.free_symbols}))

    @cached_property
    def variables(self) -> tuple[str, ...]:
        return tuple(self.coeffs)

    def extent(self, sizes: dict[str, int]) -> tuple[int, int]:
        """Smallest and largest value of the map over the index ranges."""
        low = self.offset
        high = self.offset + sum(c * (sizes[k] - 1) for k, c in self.coeffs.items())
        return low, high

    def __str__(self) -> str:
        return f"{self.target} = {self.expr}"
