"""Steps: the instructions an evaluation order is made of (what prints is what runs).

Every step reads named operands and writes one (``Tensor``: a name and its index layout, the
layout the result has). Names: ``X`` the bound input (raw input indices; integer ids for a one-hot
operand), ``G`` the output gradient (output indices), ``p`` a parameter-shaped vector, ``u`` an
m-vector; a primed name (``G'``) is the same tensor read with the second sample's indices.
Each step carries its closed-form cost in role-class symbols (``flops``, and ``size``: the elements
of its result; ``view``: the result is a view that costs no memory).

    Contract        out = sum over the indices not in out of prod(inputs)      (an einsum)
    Unfold          U[n,..,C,I] = X[n,.., map(C, I)]                           (strided view)
    ConvForward     Y = conv(X, p)            the layer's own convolution with weights p
    ConvWeightGrad  J[n, param] = conv_weight(X_n, G_n) per sample, or
                    JTu[param] = conv_weight(X, Gu) summed (the layer's weight gradient)
    RawCovUnfold    C1[C, C', n, n'] = sum_K R[map(C, K), map(C', K), n, n']
    UnfoldOutput    GU[n,..,C,K] = G[n,.., map(C, K)]  (output maps: zero outside [0, N_o); strided view)
    ConvTransposeForward     Y = conv_transpose(X, p)   the layer's own transposed convolution
    ConvTransposeWeightGrad  JTu[param] = the transposed convolution's weight gradient, summed over
                    samples (a convolution weight gradient with the windowed G as its input)
    SymmetricGram   K = J J^T over the flattened parameter (upper blocks only)
    OneHotEqual     C1[n, n', t, t'] = [X[n, t] == X[n', t']]                  (ids: U U'^T)
    OneHotGather    Y[n, t, ..] = p[.., X[n, t], ..]                           (ids: U p)
    OneHotScatter   J[n, param] = sum_t [X[n,t] == v] G[n, t, ..]  (or summed over n: JTu)

A backend implements each step kind it supports (``tengrad.codegen.backend.Backend``); ``key`` is
what it matches on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import sympy

from .einsum import Einsum, Tensor


def base(name: str) -> str:
    """The operand a (possibly primed) name reads: ``G'`` -> ``G``."""
    return name.rstrip("'")


@dataclass(frozen=True)
class Step:
    out: Tensor
    inputs: tuple[Tensor, ...]
    flops: sympy.Expr = field(default=sympy.Integer(0), compare=False, repr=False)
    size: sympy.Expr = field(default=sympy.Integer(0), compare=False, repr=False)
    view: bool = False
    op: ClassVar[str] = "step"

    @property
    def key(self) -> tuple[str, str, tuple[str, ...]]:
        """``(op, out name, input names)``: what a backend's handler table matches."""
        return self.op, self.out.name, tuple(base(t.name) for t in self.inputs)

    def formula(self) -> str:
        return f"{self.op}({', '.join(str(t) for t in self.inputs)})"

    def __str__(self) -> str:
        return f"{self.out} = {self.formula()}"


@dataclass(frozen=True)
class Contract(Step):
    op: ClassVar[str] = "contract"

    @property
    def einsum(self) -> Einsum:
        return Einsum(self.inputs, self.out)

    def formula(self) -> str:
        summed = self.einsum.summed
        return (f"sum_{{{','.join(summed)}}} " if summed else "") + " ".join(str(t) for t in self.inputs)


@dataclass(frozen=True)
class Unfold(Step):
    maps: tuple[str, ...] = ()
    op: ClassVar[str] = "unfold"

    def formula(self) -> str:
        return f"{self.inputs[0].name} read at {', '.join(self.maps)}" + ("  (strided view)" if self.view else "")


@dataclass(frozen=True)
class ConvForward(Step):
    op: ClassVar[str] = "conv_forward"

    def formula(self) -> str:
        return f"conv({self.inputs[0].name}, {self.inputs[1].name})  (the layer's own convolution, weights p)"


@dataclass(frozen=True)
class ConvWeightGrad(Step):
    op: ClassVar[str] = "conv_weight_grad"

    def formula(self) -> str:
        x, g = (t.name for t in self.inputs)
        per = "per sample" if self.inputs[1].indices[0] in self.out.indices else "summed over samples"
        return f"conv_weight({x}, {g})  (the layer's weight gradient, {per})"


@dataclass(frozen=True)
class UnfoldOutput(Step):
    maps: tuple[str, ...] = ()
    op: ClassVar[str] = "unfold_output"

    def formula(self) -> str:
        return (f"{self.inputs[0].name} read at {', '.join(self.maps)}  (output gradient unfolded, zero outside"
                " the output; strided view)")


@dataclass(frozen=True)
class ConvTransposeForward(Step):
    op: ClassVar[str] = "conv_transpose_forward"

    def formula(self) -> str:
        return (f"conv_transpose({self.inputs[0].name}, {self.inputs[1].name})  (the layer's own transposed "
                "convolution, weights p)")


@dataclass(frozen=True)
class ConvTransposeWeightGrad(Step):
    op: ClassVar[str] = "conv_transpose_weight_grad"

    def formula(self) -> str:
        x, g = (t.name for t in self.inputs)
        return f"conv_transpose_weight({x}, {g})  (the transposed convolution's weight gradient, summed over samples)"


@dataclass(frozen=True)
class RawCovUnfold(Step):
    kernels: tuple[str, ...] = ()
    maps: tuple[str, ...] = ()
    op: ClassVar[str] = "raw_cov_unfold"

    def formula(self) -> str:
        return f"sum_{{{','.join(self.kernels)}}} {self.inputs[0].name} read at {', '.join(self.maps)} (and primed)"


@dataclass(frozen=True)
class SymmetricGram(Step):
    op: ClassVar[str] = "symmetric_gram"

    def formula(self) -> str:
        j = self.inputs[0]
        return f"sum {j} {j.name}'[n',...]  (J J^T, blocks on and above the diagonal)"


@dataclass(frozen=True)
class OneHotEqual(Step):
    op: ClassVar[str] = "one_hot_equal"

    def formula(self) -> str:
        a, b = self.inputs
        return f"[{a} == {b}]  (one-hot covariance: an equality mask of the ids)"


@dataclass(frozen=True)
class OneHotGather(Step):
    hot: str = ""
    op: ClassVar[str] = "one_hot_gather"

    def formula(self) -> str:
        return f"{self.inputs[1].name}[{self.hot} = {self.inputs[0]}]  (gather rows of p at the ids)"


@dataclass(frozen=True)
class OneHotScatter(Step):
    hot: str = ""
    op: ClassVar[str] = "one_hot_scatter"

    def formula(self) -> str:
        x, g = self.inputs
        return f"sum {g} [{x} == {self.hot}]  (scatter-add rows of {g.name} at the ids)"
