"""An order's closed-form cost as a compiled function of the role-class sizes.

``Order.flops`` and ``Order.memory`` are sympy expressions in the class symbols (``m``, ``N_g``,
``N_v``, ``N_I``, ``N_C``, ``N_Ir``, ``N_K``, ``N_P``, ``N_Cu``, ``N_Vr``, ``N_O``). Substituting
sizes into them (``expr.subs``) costs about a millisecond per expression, so planning a new input
shape cost tens of milliseconds per layer. Here each expression is split once into numerator and
denominator polynomials with integer coefficients (``sympy.fraction(sympy.together(e))``) and each is
``sympy.lambdify``-ed into a plain Python function; evaluated on Python ints they are exact, and

    cost(sizes) = num(sizes) // den(sizes)       (= int(e.subs(sizes)) for positive sizes)

A few microseconds per call. An expression holding anything but the class symbols (none does today)
keeps ``subs``.
"""
from __future__ import annotations

from typing import Callable

import sympy

from .operand import N_C, N_I, N_K, N_O, N_P, N_Cu, N_Ir, N_Vr, N_g, N_v, m

#: the arguments of every compiled cost function, in this order
CLASS_SYMBOLS = (m, N_g, N_v, N_I, N_C, N_Ir, N_K, N_P, N_Cu, N_Vr, N_O)


def compile_expr(expr) -> Callable[[dict], int]:
    """``f(values) -> int`` with ``f(values) == int(expr.subs(values))`` for positive integer sizes
    (``values``: {class symbol: size}, every symbol of ``CLASS_SYMBOLS`` present)."""
    expr = sympy.sympify(expr)
    if not expr.free_symbols <= set(CLASS_SYMBOLS):
        return lambda values: int(expr.subs(values))
    num, den = sympy.fraction(sympy.together(expr))
    f_num = sympy.lambdify(CLASS_SYMBOLS, num, modules=[{}])
    if den == 1:
        return lambda values: int(f_num(*[values[s] for s in CLASS_SYMBOLS]))
    f_den = sympy.lambdify(CLASS_SYMBOLS, den, modules=[{}])

    def evaluate(values: dict) -> int:
        args = [values[s] for s in CLASS_SYMBOLS]
        n, d = int(f_num(*args)), int(f_den(*args))
        q = abs(n) // abs(d)
        return q if (n >= 0) == (d >= 0) else -q      # truncated toward zero, as int(Rational)
    return evaluate
