"""Evaluation orders: each quantity as a small program of steps (``tengrad_ir.steps``), with its
closed-form cost summed over the steps (sympy, role-class symbols).

Sizes are per role class (paper, Corollary 2): ``m`` samples, ``N_g`` group, ``N_v`` free,
``N_I`` independent and ``N_C`` common. The unfolding-aware order ``factored_raw`` splits the
independent indices into those of the raw input ``N_Ir`` (e.g. ci) and those that only appear in
index maps ``N_K`` (kh kw), the common ones into mapped and unmapped ``N_Cu``, and uses the padded
extent ``N_P`` of the mapped raw input indices (ih iw) that the maps read inside the input
(zero padding costs nothing: R is computed on the input and padded afterwards).

Gram orders (K = J J^T):

* ``direct``   forms J (Lemma 1), then K = J J^T:  2 m N_g N_v N_C N_I + 2 m^2 N_g N_v N_I.
* ``factored`` the paper's covariance factorisation (Theorem 2): C1 = U U^T, C2 = G G^T,
  K = sum C1 * C2:  2 m^2 N_g N_C^2 (N_I + N_v + 1).
* ``factored_raw`` (layers with index maps) computes the input covariance on the *raw* input,
  R = X X^T over the unmapped independent indices, then C1[n,k,C,C'] = sum_K R[n,k,map(C,K),map(C',K)]
  (the covariance of the unfolded input is the unfolding of the covariance of the input):
  2 m^2 N_g N_Cu^2 N_Ir N_P^2 + m^2 N_g N_C^2 N_K instead of 2 m^2 N_g N_C^2 N_I. With output maps
  (a transposed conv) the roles swap: R = G G^T on the raw output gradient over the free indices
  outside the maps (N_Vr), C2 its unfolding, C1 = X X^T as in ``factored``.

J p orders: ``direct`` (form J, then J p) and ``forward`` (the layer run with weights p, then a
per-sample inner product with G). J^T u orders: ``direct`` (J^T u from J) and ``weight_grad`` (the
layer's weight gradient with G scaled per sample by u) and, for an input without index maps,
``scaled_input`` (u scales X instead: m N_C N_I instead of m N_C N_v for the scaling, so it wins when
N_I < N_v, e.g. a widening Linear). ``jacobian`` has one order, the steps that
form J. The operand kind (``operand``) supplies the steps that read U.

An order's cost is the sum of its steps' flops; its memory is the sum of the results of all but its
last step (views excluded). The direct Gram is the contraction path ``[(0, 1), (0, 1), (0, 1)]`` and
the factored Gram ``[(0, 2), (0, 1), (0, 1)]`` of the 4-operand einsum ``U G U' G' -> K``;
opt_einsum's count for those paths is ``einsum_flops``. opt_einsum sees four independent operands,
so its direct count forms J twice; ``flops`` (what the choice uses) forms it once.
"""
from __future__ import annotations

import functools
from typing import Callable
from dataclasses import dataclass
from functools import cached_property

import sympy

from .cost_fn import compile_expr
from .derive import primed
from .einsum import Einsum, Tensor
from .geometry import ConvGeometry, conv_geometry, raw_factorable
from .operand import (CLASS_SIZE, N_C, N_I, N_K, N_O, N_P, N_Cu, N_Ir, N_Vr, N_g, N_v, Term, class_size, kind_of,
                      m)
from .spec import LayerSpec
from .steps import Contract, RawCovUnfold, Step, SymmetricGram

QUANTITIES = ("gram", "jvp", "vjp")   # the quantities an order is chosen for
PROGRAMS = QUANTITIES + ("jacobian",)  # every program a backend runs

__all__ = ["Order", "enumerate_orders", "QUANTITIES", "PROGRAMS", "ConvGeometry", "conv_geometry",
           "raw_factorable", "class_size", "CLASS_SIZE", "m", "N_g", "N_v", "N_I", "N_C", "N_Ir", "N_K",
           "N_P", "N_Cu", "N_Vr", "N_O"]


@dataclass(frozen=True, eq=False)
class Order:
    """One evaluation order of one quantity: its steps, and costs computed from them."""

    quantity: str
    name: str
    steps: tuple[Step, ...]
    note: str = ""
    einsum_flops: sympy.Expr | None = None
    einsum_path: tuple[tuple[int, int], ...] | None = None

    @cached_property
    def flops(self) -> sympy.Expr:
        return sympy.Add(*[s.flops for s in self.steps])

    @cached_property
    def formula(self) -> sympy.Expr:
        """``flops`` factored, as printed."""
        return sympy.factor(self.flops)

    @cached_property
    def memory(self) -> sympy.Expr:
        return sympy.Add(sympy.Integer(0), *[s.size for s in self.steps[:-1] if not s.view])

    @cached_property
    def cost_fns(self) -> tuple[Callable[[dict], int], Callable[[dict], int]]:
        """(flops, memory) compiled once per order (cost_fn.py): {class symbol: size} -> int."""
        return compile_expr(self.flops), compile_expr(self.memory)


def _flops(e: Einsum) -> sympy.Expr:
    return e.flops(class_size)


def _factored_raw(t: Term) -> tuple[Step, ...]:
    """R = X X' on the raw input (sample pair last), C1 its unfolding summed over the kernel indices,
    C2 = G G' in the same layout, K = sum C1 * C2 (each kernel position streams m x m blocks)."""
    s, d = t.spec, t.cls
    n = s.batch
    pair = (n, n + "'")
    com = s.indices("common")
    second = {n, *com, *(mp.target for mp in s.maps)}
    x = Tensor("X", s.raw_input_indices)
    kept = tuple(i for i in x.indices[1:] if s.roles.get(i) != "independent")
    r = Tensor("R", kept + primed(tuple(i for i in kept if i in second), second) + pair)
    layout = s.indices("group") + com + primed(com, second) + pair
    c1, c2 = Tensor("C1", layout), Tensor("C2", layout)
    g = t.tensor("cov_grad", "G")
    # class-level R: the raw input's unmapped common (Cu) and independent (Ir) indices, mapped (P)
    has_ir = any(s.roles.get(i) == "independent" for i in s.raw_input_indices)
    has_cu = any(s.roles.get(i) == "common" for i in s.raw_input_indices)
    gc = ("g",) if s.indices("group") else ()
    cu, cu2 = (("Cu",), ("Cu'",)) if has_cu else ((), ())
    ir = ("Ir",) if has_ir else ()
    r_cls = Einsum((Tensor("X", ("n",) + gc + cu + ir + ("P",)), Tensor("X'", ("n'",) + gc + cu2 + ir + ("P'",))),
                   Tensor("R", ("n", "n'") + gc + cu + cu2 + ("P", "P'")))
    kernels = tuple(dict.fromkeys(v for mp in s.maps for v in mp.variables if s.roles[v] == "independent"))
    return (
        Contract(r, (x, Tensor("X'", primed(x.indices, second))), _flops(r_cls), r_cls.out_size(class_size)),
        RawCovUnfold(c1, (r,), m**2 * N_g * N_C**2 * N_K, d.cov_input.out_size(class_size), kernels=kernels,
                     maps=tuple(str(mp) for mp in s.maps)),
        Contract(c2, (g, Tensor("G'", primed(g.indices, second))), _flops(d.cov_grad), d.cov_grad.out_size(class_size)),
        Contract(t.tensor("gram_factored", "K"), (c1, c2), _flops(d.gram_factored), sympy.Integer(1)),
    )


def _factored_raw_grad(t: Term) -> tuple[Step, ...]:
    """Output maps (a transposed conv): roles swapped. C1 = X X' over the independent indices, laid
    out like C2; R = G G' on the raw output gradient over the free indices outside the maps (Vr),
    C2[n,n',g,C,C'] = sum_K R[n,n',g,map(C,K),map(C',K)]; K = sum C1 * C2.
    Cost: 2 m^2 N_g N_C^2 N_I + 2 m^2 N_g N_Cu^2 N_Vr N_P^2 + m^2 N_g N_C^2 N_K + 2 m^2 N_g N_C^2."""
    s, d = t.spec, t.cls
    n = s.batch
    pair = (n, n + "'")
    com = s.indices("common")
    second = {n, *com, *(mp.target for mp in s.out_maps)}
    layout = s.indices("group") + com + primed(com, second) + pair
    c1, c2 = Tensor("C1", layout), Tensor("C2", layout)
    x = Tensor("X", s.raw_input_indices)
    g = Tensor("G", s.output_indices)
    kept = tuple(i for i in g.indices[1:] if s.roles.get(i) != "free")
    r = Tensor("R", kept + primed(tuple(i for i in kept if i in second), second) + pair)
    has_cu = any(s.roles.get(i) == "common" for i in s.output_indices)
    gc = ("g",) if s.indices("group") else ()
    cu, cu2 = (("Cu",), ("Cu'",)) if has_cu else ((), ())
    vr = ("Vr",) if any(s.roles.get(i) == "free" for i in s.output_indices) else ()
    r_cls = Einsum((Tensor("G", ("n",) + gc + cu + vr + ("P",)), Tensor("G'", ("n'",) + gc + cu2 + vr + ("P'",))),
                   Tensor("R", ("n", "n'") + gc + cu + cu2 + ("P", "P'")))
    kernels = tuple(dict.fromkeys(v for mp in s.out_maps for v in mp.variables if s.roles[v] == "free"))
    return (
        Contract(c1, (x, Tensor("X'", primed(x.indices, second))), _flops(d.cov_input),
                 d.cov_input.out_size(class_size)),
        Contract(r, (g, Tensor("G'", primed(g.indices, second))), _flops(r_cls), r_cls.out_size(class_size)),
        RawCovUnfold(c2, (r,), m**2 * N_g * N_C**2 * N_K, d.cov_grad.out_size(class_size), kernels=kernels,
                     maps=tuple(str(mp) for mp in s.out_maps)),
        Contract(t.tensor("gram_factored", "K"), (c1, c2), _flops(d.gram_factored), sympy.Integer(1)),
    )


@functools.lru_cache(maxsize=1024)   # one entry per distinct layer spec
def enumerate_orders(spec: LayerSpec) -> dict[str, tuple[Order, ...]]:
    """Every valid evaluation order of each program, in a fixed order of preference for ties."""
    t = Term.of(spec)
    kind = kind_of(spec)
    d = t.cls
    conv = conv_geometry(spec) is not None
    jac = tuple(kind.jacobian(t))
    j = t.tensor("gram_direct", "J")
    k = t.tensor("gram_direct", "K")
    c1 = tuple(kind.cov_input(t))
    direct_gram = SymmetricGram(k, (j,), _flops(d.gram_direct), sympy.Integer(1))
    factored = c1 + tuple(kind.unfold_grad(t)) + (t.contract("cov_grad", kind.grad_table()),
                                                  t.contract("gram_factored", {} if c1 else {"C1": None}))
    gram = [
        Order("gram", "direct", jac + (direct_gram,),
              "J formed once" + (" (the layer's per-sample weight gradient)" if conv else ""),
              _flops(d.jacobian) * 2 + _flops(d.gram_direct), ((0, 1), (0, 1), (0, 1))),
        Order("gram", "factored", factored,
              "the paper's covariance factorisation" + (" (one-hot: C1 is an equality mask)"
                                                        if kind.integer_ids else ""),
              _flops(d.cov_input) + _flops(d.cov_grad) + _flops(d.gram_factored), ((0, 2), (0, 1), (0, 1))),
    ]
    if raw_factorable(spec) and spec.out_maps:
        gram.append(Order("gram", "factored_raw", _factored_raw_grad(t),
                          "covariance of the raw output gradient, unfolded after the contraction"))
    elif raw_factorable(spec):
        gram.append(Order("gram", "factored_raw", _factored_raw(t),
                          "covariance of the raw input, unfolded after the contraction"))
    jvp = [
        Order("jvp", "direct", jac + (t.contract("jvp_direct"),), "from the explicit Jacobian"),
        Order("jvp", "forward", tuple(kind.forward(t)), "the layer's own forward with weights p"),
    ]
    vjp = [
        Order("vjp", "direct", jac + (t.contract("vjp_direct"),), "from the explicit Jacobian"),
        Order("vjp", "weight_grad", tuple(kind.weight_grad(t)),
              "the layer's weight gradient with G scaled per sample by u"),
    ]
    scaled = tuple(kind.scaled_input(t))
    if scaled:
        vjp.append(Order("vjp", "scaled_input", scaled,
                         "u scales the input instead of G: cheaper when the input is narrower than the output"))
    return {"gram": tuple(gram), "jvp": tuple(jvp), "vjp": tuple(vjp),
            "jacobian": (Order("jacobian", "direct", jac, "J[n, param...] (Lemma 1)"),)}
