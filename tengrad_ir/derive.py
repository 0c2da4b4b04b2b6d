"""Derivations of a ``LayerSpec``: the Jacobian, the two covariances, the Gram, J p and J^T u.

With ``G`` the per-sample output gradient and ``U`` the unfolded input (paper, Lemma 1 and
Theorem 2), every index of a term is batch ``n``, group ``g``, free ``v``, independent ``I`` or
common ``C``:

    J[n,g,v,I]        = sum_C        G[n,g,v,C] U[n,g,C,I]                  (Lemma 1)
    C1[n,k,g,C,C']    = sum_I        U[n,g,C,I] U[k,g,C',I]                 (input covariance)
    C2[n,k,g,C,C']    = sum_v        G[n,g,v,C] G[k,g,v,C']                 (gradient covariance)
    K[n,k]            = sum_{g,C,C'} C1 C2  =  sum_{g,v,I} J[n,g,v,I] J[k,g,v,I]   (Theorem 2)
    (J p)[n]          = sum_{g,v,C,I} G[n,g,v,C] U[n,g,C,I] p[g,v,I]
    (J^T u)[g,v,I]    = sum_{n,C}     u[n] G[n,g,v,C] U[n,g,C,I]

With output maps (a transposed convolution) G and Y stand for the *unfolded* output
``GU[n, .., C, K] = G[n, .., map(C, K)]``, so every formula above holds as written.

The index-level einsums name every index of the spec (for printing and for the backends); the
class-level ones collapse each role to one index (``g v I C``) so that closed-form costs read like
the paper's Corollary 2.
"""
from __future__ import annotations

from dataclasses import dataclass

from .einsum import Einsum, Tensor
from .spec import LayerSpec


def primed(indices, which) -> tuple[str, ...]:
    """The second sample's copy of the indices in ``which`` (``n -> n'``)."""
    return tuple(i + "'" if i in which else i for i in indices)


@dataclass(frozen=True)
class Derivation:
    """Einsums of one term (operands G, U, p, u, J, C1, C2, K, Y, Gu; results Jp = J p, JTu = J^T u).

    Index level: G, Y, p and J have the layouts of the real tensors (output, parameter, [n, param]).
    """

    jacobian: Einsum
    cov_input: Einsum
    cov_grad: Einsum
    gram_factored: Einsum
    gram_direct: Einsum
    jvp: Einsum
    vjp: Einsum
    forward: Einsum
    weight_grad: Einsum
    forward_dot: Einsum   # Jp[n] = sum Y[n,...] G[n,...]
    weight_scale: Einsum  # Gu[n,...] = u[n] G[n,...]
    jvp_direct: Einsum    # Jp[n] = sum J[n,...] p[...]
    vjp_direct: Einsum    # JTu[...] = sum_n u[n] J[n,...]
    input_scale: Einsum   # Uu[n,...] = u[n] U[n,...]
    scaled_grad: Einsum   # JTu[...] = sum_{n,C} G[n,...] Uu[n,...]


def derive(spec: LayerSpec, collapse: bool = False) -> Derivation:
    """The einsums of ``spec``; ``collapse=True`` gives the class-level ones (indices n g v I C)."""
    if collapse:
        present = {r: bool(spec.indices(r)) for r in ("group", "free", "independent", "common")}
        n = ("n",)
        g = ("g",) if present["group"] else ()
        v = ("v",) if present["free"] else ()
        ind = ("I",) if present["independent"] else ()
        com = ("C",) if present["common"] else ()
    else:
        n = (spec.batch,)
        g, v = spec.indices("group"), spec.indices("free")
        ind, com = spec.indices("independent"), spec.indices("common")
    second = set(n) | set(com)
    if collapse:
        G = Tensor("G", n + g + v + com)
        U = Tensor("U", n + g + com + ind)
        P = Tensor("p", g + v + ind)
        Y = Tensor("Y", n + g + v + com)
    else:  # the layouts of the real tensors: G and Y as the output (unfolded through the output
        # maps, if any: then the kind renames G to the unfolded GU), p as the parameter
        G = Tensor("G", spec.unfolded_output_indices)
        U = Tensor("U", spec.unfolded_indices)
        P = Tensor("p", spec.param_indices)
        Y = Tensor("Y", spec.unfolded_output_indices)
    J = Tensor("J", n + P.indices)
    G2, U2, J2 = (Tensor(t.name + "'", primed(t.indices, second)) for t in (G, U, J))
    C1 = Tensor("C1", n + primed(n, second) + g + com + primed(com, second))
    C2 = Tensor("C2", C1.indices)
    K = Tensor("K", n + primed(n, second))
    u = Tensor("u", n)
    JTu = Tensor("JTu", P.indices)
    return Derivation(
        jacobian=Einsum((G, U), J),
        cov_input=Einsum((U, U2), C1),
        cov_grad=Einsum((G, G2), C2),
        gram_factored=Einsum((C1, C2), K),
        gram_direct=Einsum((J, J2), K),
        jvp=Einsum((G, U, P), Tensor("Jp", n)),
        vjp=Einsum((u, G, U), JTu),
        forward=Einsum((U, P), Y),
        weight_grad=Einsum((Tensor("Gu", G.indices), U), JTu),
        forward_dot=Einsum((Y, G), Tensor("Jp", n)),
        weight_scale=Einsum((u, G), Tensor("Gu", G.indices)),
        jvp_direct=Einsum((J, P), Tensor("Jp", n)),
        vjp_direct=Einsum((u, J), JTu),
        input_scale=Einsum((u, U), Tensor("Uu", U.indices)),
        scaled_grad=Einsum((G, Tensor("Uu", U.indices)), JTu),
    )
