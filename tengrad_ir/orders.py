"""Evaluation orders of the Gram, J p and J^T u, with closed-form costs in sympy.

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
  2 m^2 N_g N_Cu^2 N_Ir N_P^2 + m^2 N_g N_C^2 N_K instead of 2 m^2 N_g N_C^2 N_I.

J p orders: ``direct`` (form J, then J p) and ``forward`` (the layer run with weights p, then a
per-sample inner product with G). J^T u orders: ``direct`` (J^T u from J) and ``weight_grad`` (the
layer's weight gradient with G scaled per sample by u).

The direct Gram is the path ``[(0, 1), (0, 1), (0, 1)]`` and the factored Gram the path
``[(0, 2), (0, 1), (0, 1)]`` of the 4-operand einsum ``U G U' G' -> K``; opt_einsum's count for those
paths is ``einsum_flops``. opt_einsum sees four independent operands, so its direct count forms J
twice; ``flops`` (what the choice uses) forms it once.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

from .derive import derive
from .einsum import Einsum, Tensor
from .spec import LayerSpec

m, N_g, N_v, N_I, N_C = sympy.symbols("m N_g N_v N_I N_C", positive=True, integer=True)
N_Ir, N_K, N_P, N_Cu = sympy.symbols("N_Ir N_K N_P N_Cu", positive=True, integer=True)
CLASS_SIZE = {"n": m, "n'": m, "g": N_g, "v": N_v, "I": N_I, "C": N_C, "C'": N_C,
              "Ir": N_Ir, "K": N_K, "P": N_P, "P'": N_P, "Cu": N_Cu, "Cu'": N_Cu}
QUANTITIES = ("gram", "jvp", "vjp")


def class_size(index: str) -> sympy.Symbol:
    return CLASS_SIZE[index]


@dataclass(frozen=True)
class Order:
    """One evaluation order of one quantity, with its closed-form costs (class symbols)."""

    quantity: str
    name: str
    steps: tuple[str, ...]
    flops: sympy.Expr
    memory: sympy.Expr
    einsum_flops: sympy.Expr | None = None
    path: tuple[tuple[int, int], ...] | None = None
    note: str = ""


@dataclass(frozen=True)
class ConvGeometry:
    """A spec whose maps are convolutions: ``target = stride*out + dilation*kernel + offset``."""

    targets: tuple[str, ...]
    outs: tuple[str, ...]
    kernels: tuple[str, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    offset: tuple[int, ...]


@functools.lru_cache(maxsize=None)
def conv_geometry(spec: LayerSpec) -> ConvGeometry | None:
    """The convolution form of the spec's maps, or None when they are not one (1 to 3 spatial dims,
    each map ``s*o + d*k + c`` with o common and k independent, no common index outside the maps)."""
    if spec.source != "input" or not 1 <= len(spec.maps) <= 3:
        return None
    rows = []
    used: set[str] = set()
    for mp in spec.maps:
        common = [v for v in mp.variables if spec.roles[v] == "common"]
        indep = [v for v in mp.variables if spec.roles[v] == "independent"]
        if len(common) != 1 or len(indep) != 1 or len(mp.variables) != 2:
            return None
        o, k = common[0], indep[0]
        if {o, k} & used:
            return None
        used |= {o, k}
        rows.append((mp.target, o, k, mp.coeffs[o], mp.coeffs[k], mp.offset))
    if set(spec.indices("common")) != {r[1] for r in rows}:
        return None
    if any(i in spec.raw_input_indices for r in rows for i in (r[1], r[2])):
        return None
    return ConvGeometry(*[tuple(col) for col in zip(*rows)])


def raw_factorable(spec: LayerSpec) -> bool:
    """Whether ``factored_raw`` applies: maps with an independent variable, disjoint from raw axes."""
    if spec.source != "input" or not spec.maps:
        return False
    variables = {v for mp in spec.maps for v in mp.variables}
    return (any(spec.roles[v] == "independent" for v in variables)
            and not variables & set(spec.raw_input_indices))


def _flops(e: Einsum) -> sympy.Expr:
    return e.flops(class_size)


@functools.lru_cache(maxsize=None)
def enumerate_orders(spec: LayerSpec) -> dict[str, tuple[Order, ...]]:
    """Every valid evaluation order of each quantity, in a fixed order of preference for ties."""
    d = derive(spec, collapse=True)
    shown = derive(spec)
    one_hot = spec.source == "one_hot"
    conv = conv_geometry(spec) is not None
    # One-hot input: contracting U over its one-hot index is a gather/scatter, not a product.
    gather = {N_I: 1} if one_hot else {}
    j_flops = _flops(d.jacobian).subs(gather)
    j_mem = d.jacobian.out_size(class_size)
    unfold = m * N_g * N_C * N_I if (spec.maps and not conv) else sympy.Integer(0)
    raw_path_direct = _flops(d.jacobian) * 2 + _flops(d.gram_direct)
    raw_path_factored = _flops(d.cov_input) + _flops(d.cov_grad) + _flops(d.gram_factored)
    gram = [
        Order("gram", "direct", (str(shown.jacobian), str(shown.gram_direct)),
              j_flops + _flops(d.gram_direct), j_mem + unfold, raw_path_direct,
              ((0, 1), (0, 1), (0, 1)),
              "J formed once" + (" (the layer's per-sample weight gradient)" if conv else "")),
        Order("gram", "factored", (str(shown.cov_input), str(shown.cov_grad), str(shown.gram_factored)),
              _flops(d.cov_input).subs(gather) + _flops(d.cov_grad) + _flops(d.gram_factored),
              2 * d.cov_input.out_size(class_size) + unfold, raw_path_factored,
              ((0, 2), (0, 1), (0, 1)),
              "the paper's covariance factorisation" + (" (one-hot: C1 is an equality mask)" if one_hot else "")),
    ]
    if raw_factorable(spec):
        has_ir = any(spec.roles.get(i) == "independent"
                     for i in spec.raw_input_indices)
        has_cu = any(spec.roles.get(i) == "common" for i in spec.raw_input_indices)
        g = ("g",) if spec.indices("group") else ()
        cu = ("Cu",) if has_cu else ()
        cu2 = ("Cu'",) if has_cu else ()
        ir = ("Ir",) if has_ir else ()
        r = Einsum((Tensor("X", ("n",) + g + cu + ir + ("P",)), Tensor("X'", ("n'",) + g + cu2 + ir + ("P'",))),
                   Tensor("R", ("n", "n'") + g + cu + cu2 + ("P", "P'")))
        unfold_sum = m**2 * N_g * N_C**2 * N_K
        gram.append(Order(
            "gram", "factored_raw",
            ("R[n,n',g,P,P'] = sum_Ir X[n,g,Ir,P] X[n',g,Ir,P']   (P: raw mapped indices "
             + " ".join(mp.target for mp in spec.maps) + ")",
             "C1[n,n',g,C,C'] = sum_K R[n,n',g,map(C,K),map(C',K)]", str(shown.cov_grad), str(shown.gram_factored)),
            _flops(r) + unfold_sum + _flops(d.cov_grad) + _flops(d.gram_factored),
            r.out_size(class_size) + 2 * d.cov_input.out_size(class_size), None, None,
            "covariance of the raw input, unfolded after the contraction"))
    fwd_mem = d.forward.out_size(class_size)
    jp_direct = Einsum((d.jacobian.out, d.jvp.operands[2]), d.jvp.out)
    jvp = [
        Order("jvp", "direct", (str(shown.jacobian), "Jp[n] = sum J[n,...] p[...]"),
              j_flops + _flops(jp_direct), j_mem + unfold, note="from the explicit Jacobian"),
        Order("jvp", "forward", (str(shown.forward), "Jp[n] = sum Y[n,...] G[n,...]"),
              _flops(d.forward).subs(gather) + _flops(Einsum((d.forward.out, d.jvp.operands[0]), d.jvp.out)),
              fwd_mem + unfold, note="the layer's own forward with weights p"),
    ]
    jtu_direct = Einsum((Tensor("u", ("n",)), d.jacobian.out), d.vjp.out)
    vjp = [
        Order("vjp", "direct", (str(shown.jacobian), "p[...] = sum_n u[n] J[n,...]"),
              j_flops + _flops(jtu_direct), j_mem + unfold, note="from the explicit Jacobian"),
        Order("vjp", "weight_grad", ("Gu[n,...] = u[n] G[n,...]", str(shown.weight_grad)),
              fwd_mem + _flops(d.weight_grad).subs(gather), fwd_mem + unfold,
              note="the layer's weight gradient with G scaled per sample by u"),
    ]
    return {"gram": tuple(gram), "jvp": tuple(jvp), "vjp": tuple(vjp)}
