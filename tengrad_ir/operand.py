"""Operand kinds: where a term's unfolded input U comes from, and the steps that read it.

    input     U = X read through the index maps (the module input after its pre-map); without maps
              U is X itself, with conv maps the layer's own convolution kernels read X
    ones      U = 1 (a bias): U drops out of every product, there is no input tensor
    one_hot   U[n, t, v] = [X[n, t] == v] (an embedding): X holds integer ids, never expanded;
              products with U become gathers, scatters and an equality mask

A kind owns its special cases: which tensor is bound as ``X`` (``x_indices``, ``x_axes``, whether it
holds integer ids) and the steps of the four building blocks of every order (``jacobian``: J,
``cov_input``: C1, ``forward``: J p through Y = U p, ``weight_grad``: J^T u through Gu = u G). Each
step gets its closed-form cost from the class-level derivation (``tengrad_ir.derive``).

An ``input`` spec with *output* maps (a transposed convolution) is the kind ``output_maps``: U is X
itself and the output gradient is the operand read through the maps, GU = G at map(C, K)
(``unfold_grad``); J, C2 and the direct orders contract GU, J p runs the layer's own transposed
convolution and J^T u its weight gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import sympy

from .derive import Derivation, derive
from .einsum import Einsum, Tensor
from .geometry import ConvGeometry, conv_geometry, transposed_geometry
from .notation import Axes
from .spec import LayerSpec
from .steps import (Contract, ConvForward, ConvTransposeForward, ConvTransposeWeightGrad, ConvWeightGrad,
                    OneHotEqual, OneHotGather, OneHotScatter, Step, Unfold, UnfoldOutput, base)

m, N_g, N_v, N_I, N_C = sympy.symbols("m N_g N_v N_I N_C", positive=True, integer=True)
N_Ir, N_K, N_P, N_Cu = sympy.symbols("N_Ir N_K N_P N_Cu", positive=True, integer=True)
N_Vr, N_O = sympy.symbols("N_Vr N_O", positive=True, integer=True)  # output maps: raw free, output positions
CLASS_SIZE = {"n": m, "n'": m, "g": N_g, "v": N_v, "I": N_I, "C": N_C, "C'": N_C,
              "Ir": N_Ir, "K": N_K, "P": N_P, "P'": N_P, "Cu": N_Cu, "Cu'": N_Cu, "Vr": N_Vr, "O": N_O}


def class_size(index: str) -> sympy.Symbol:
    return CLASS_SIZE[index]


def rewrite(e: Einsum, table: dict[str, str | None]) -> Einsum:
    """``e`` with operands renamed (``{"U": "X"}``) or dropped (``{"U": None}``), primes kept."""
    ops = []
    for t in e.operands:
        name = base(t.name)
        if name not in table:
            ops.append(t)
        elif table[name] is not None:
            ops.append(Tensor(table[name] + t.name[len(name):], t.indices))
    return Einsum(tuple(ops), e.out)


@dataclass(frozen=True)
class Term:
    """A spec with both derivations: ``shown`` (index level, what runs) and ``cls`` (class level,
    what the costs are written in)."""

    spec: LayerSpec
    shown: Derivation
    cls: Derivation

    @staticmethod
    def of(spec: LayerSpec) -> "Term":
        return Term(spec, derive(spec), derive(spec, collapse=True))

    def contract(self, which: str, table: dict[str, str | None] | None = None,
                 flops: Callable[[sympy.Expr], sympy.Expr] = lambda f: f) -> Contract:
        """The Contract step of derivation ``which`` (e.g. ``"cov_grad"``), operands rewritten."""
        shown, cls = getattr(self.shown, which), getattr(self.cls, which)
        if table:
            shown, cls = rewrite(shown, table), rewrite(cls, table)
        return Contract(shown.out, shown.operands, flops(cls.flops(class_size)), cls.out_size(class_size))

    def size(self, which: str) -> sympy.Expr:
        return getattr(self.cls, which).out_size(class_size)

    def flops(self, which: str) -> sympy.Expr:
        return getattr(self.cls, which).flops(class_size)

    def tensor(self, which: str, name: str) -> Tensor:
        """The index-level tensor called ``name`` in derivation ``which``."""
        e = getattr(self.shown, which)
        return next(t for t in (*e.operands, e.out) if t.name == name)


class OperandKind:
    """The interface of a kind; see the module docstring."""

    name: ClassVar[str]
    integer_ids: ClassVar[bool] = False

    def x_indices(self, spec: LayerSpec) -> tuple[str, ...]:
        """The dims of the bound input ``X`` (empty: no input tensor)."""
        return spec.raw_input_indices

    def x_axes(self, spec: LayerSpec) -> Axes | None:
        """The axes the module input is bound with (None: the input is not read)."""
        return spec.input_axes

    def describe(self, spec: LayerSpec) -> str:
        return ""

    def jacobian(self, t: Term) -> list[Step]:
        raise NotImplementedError

    def cov_input(self, t: Term) -> list[Step]:
        raise NotImplementedError

    def forward(self, t: Term) -> list[Step]:
        raise NotImplementedError

    def weight_grad(self, t: Term) -> list[Step]:
        return [t.contract("weight_scale")] + self._weight_grad(t)

    def _weight_grad(self, t: Term) -> list[Step]:
        raise NotImplementedError

    def scaled_input(self, t: Term) -> list[Step]:
        """J^T u with u scaling the input instead of G (empty: the kind has no such order)."""
        return []

    def unfold_grad(self, t: Term) -> list[Step]:
        """The steps that make the G the derivations contract (empty: G is the output gradient)."""
        return []

    def grad_table(self) -> dict[str, str | None]:
        """Renames of G in the derivations' contractions (output maps: ``{"G": "GU"}``)."""
        return {}


class InputKind(OperandKind):
    name = "input"

    @staticmethod
    def _x(t: Term) -> Tensor:
        return Tensor("X", t.spec.raw_input_indices)

    def _unfold(self, t: Term) -> list[Step]:
        """U from X: nothing without maps (U is X), a strided view for conv maps (the convolution
        kernels and the covariance read it in place), a materialised copy otherwise."""
        s = t.spec
        if not s.maps:
            return []
        view = conv_geometry(s) is not None
        return [Unfold(t.tensor("jacobian", "U"), (self._x(t),), sympy.Integer(0),
                       m * N_g * N_C * N_I, view=view, maps=tuple(str(mp) for mp in s.maps))]

    @staticmethod
    def _u(t: Term) -> dict[str, str | None]:
        return {} if t.spec.maps else {"U": "X"}

    def jacobian(self, t):
        geo = conv_geometry(t.spec)
        if geo is not None:
            j = t.contract("jacobian")
            return [ConvWeightGrad(j.out, (self._x(t), t.tensor("jacobian", "G")), j.flops, j.size)]
        return self._unfold(t) + [t.contract("jacobian", self._u(t))]

    def cov_input(self, t):
        return self._unfold(t) + [t.contract("cov_input", self._u(t))]

    def forward(self, t):
        geo: ConvGeometry | None = conv_geometry(t.spec)
        if geo is not None:
            s = t.spec
            y = Tensor("Y", (s.batch,) + s.indices("group") + s.indices("free") + geo.outs)
            fwd = t.contract("forward")
            back = Einsum((y, t.tensor("forward", "Y") and Tensor("G", s.output_indices)), Tensor("Jp", (s.batch,)))
            return [ConvForward(y, (self._x(t), t.tensor("forward", "p")), fwd.flops, fwd.size),
                    Contract(back.out, back.operands, t.flops("forward_dot"), sympy.Integer(1))]
        return self._unfold(t) + [t.contract("forward", self._u(t)), t.contract("forward_dot")]

    def _weight_grad(self, t):
        if conv_geometry(t.spec) is not None:
            w = t.contract("weight_grad")
            return [ConvWeightGrad(w.out, (self._x(t), t.tensor("weight_grad", "Gu")), w.flops, w.size)]
        return self._unfold(t) + [t.contract("weight_grad", self._u(t))]

    def scaled_input(self, t):
        if t.spec.maps:  # an unfolded copy scaled per sample would cost an im2col; the conv kernels win
            return []
        return [t.contract("input_scale", self._u(t)), t.contract("scaled_grad")]


class OnesKind(OperandKind):
    name = "ones"
    drop: ClassVar[dict[str, str | None]] = {"U": None}

    def x_indices(self, spec):
        return ()

    def x_axes(self, spec):
        return None

    def describe(self, spec):
        return "(input: ones)"

    def jacobian(self, t):
        return [t.contract("jacobian", self.drop)]

    def cov_input(self, t):
        return []  # C1 = 1: the Gram is the sum of C2

    def forward(self, t):
        return [t.contract("jvp", self.drop)]  # Jp[n] = sum G[n, ...] p[...]

    def _weight_grad(self, t):
        return [t.contract("weight_grad", self.drop)]


class OneHotKind(OperandKind):
    """Products with U = [X == v] cost no multiply over v: their class costs take N_I = 1."""

    name = "one_hot"
    integer_ids = True

    def x_indices(self, spec):
        return tuple(i for i in spec.raw_input_indices if i != spec.one_hot)

    def x_axes(self, spec):
        return tuple(a for a in spec.input_axes if a != (spec.one_hot,))

    def describe(self, spec):
        return f"(input: one-hot ids along {spec.one_hot})"

    @staticmethod
    def _ids(t: Term, primed: bool = False) -> Tensor:
        s = t.spec
        second = {s.batch, *s.indices("common")}
        idx = OneHotKind().x_indices(s)
        return Tensor("X'", tuple(i + "'" if i in second else i for i in idx)) if primed else Tensor("X", idx)

    def jacobian(self, t):
        j = t.contract("jacobian", flops=lambda f: f.subs(N_I, 1))
        return [OneHotScatter(j.out, (self._ids(t), t.tensor("jacobian", "G")), j.flops, j.size, hot=t.spec.one_hot)]

    def cov_input(self, t):
        s = t.spec
        a, b = self._ids(t), self._ids(t, primed=True)
        c1 = Tensor("C1", (s.batch, s.batch + "'") + a.indices[1:] + b.indices[1:])
        return [OneHotEqual(c1, (a, b), t.flops("cov_input").subs(N_I, 1), t.size("cov_input"))]

    def forward(self, t):
        y = t.contract("forward", flops=lambda f: f.subs(N_I, 1))
        return [OneHotGather(y.out, (self._ids(t), t.tensor("forward", "p")), y.flops, y.size, hot=t.spec.one_hot),
                t.contract("forward_dot")]

    def _weight_grad(self, t):
        w = t.contract("weight_grad", flops=lambda f: f.subs(N_I, 1))
        return [OneHotScatter(w.out, (self._ids(t), t.tensor("weight_grad", "Gu")), w.flops, w.size,
                              hot=t.spec.one_hot)]


class OutputMapKind(InputKind):
    """An input without maps and an output gradient read through the output maps (transposed conv):

        GU[n, g, v, C, K] = G[n, g, v, map(C, K)]       (zero outside [0, N_o); K free, C common)
        J[n, g, I, v, K]  = sum_C X[n, g, I, C] GU[n, g, v, C, K]

    J and C2 contract GU; J^T u runs the transposed convolution's weight gradient, J p its forward.
    The forward's inner product and the scaling by u run on the real output [n, g, Vr, O]: Vr the
    free indices outside the maps (output channels), O the mapped output positions."""

    name = "output_maps"

    @staticmethod
    def _g(t: Term) -> Tensor:
        return Tensor("G", t.spec.output_indices)

    def unfold_grad(self, t):
        s = t.spec
        return [UnfoldOutput(Tensor("GU", s.unfolded_output_indices), (self._g(t),), sympy.Integer(0),
                             m * N_g * N_v * N_C, view=True, maps=tuple(str(mp) for mp in s.out_maps))]

    def grad_table(self):
        return {"G": "GU"}

    @staticmethod
    def _real(t: Term, name: str) -> Tensor:
        """The class-level real output tensor ``name[n, g, Vr, O]``."""
        return Tensor(name, ("n",) + (("g",) if t.spec.indices("group") else ()) + ("Vr", "O"))

    def _table(self) -> dict[str, str | None]:
        return {"U": "X", "G": "GU"}

    def jacobian(self, t):
        # GU is a strided view and J one contraction with X, faster than the transposed conv's
        # weight gradient with the batch folded into the groups (timings: docs/experiments/gram.md)
        return self.unfold_grad(t) + [t.contract("jacobian", self._table())]

    def cov_input(self, t):
        return [t.contract("cov_input", {"U": "X"})]

    def forward(self, t):
        s = t.spec
        if transposed_geometry(s) is None:
            return self.unfold_grad(t) + [t.contract("forward", {"U": "X"}), t.contract("forward_dot", {"G": "GU"})]
        y = Tensor("Y", s.output_indices)
        fwd = t.contract("forward")
        dot = Einsum((y, self._g(t)), Tensor("Jp", (s.batch,)))
        dot_cls = Einsum((self._real(t, "Y"), self._real(t, "G")), Tensor("Jp", ("n",)))
        return [ConvTransposeForward(y, (self._x(t), t.tensor("forward", "p")), fwd.flops,
                                     sympy.Mul(*[class_size(i) for i in self._real(t, "Y").indices])),
                Contract(dot.out, dot.operands, dot_cls.flops(class_size), sympy.Integer(1))]

    def weight_grad(self, t):
        s = t.spec
        if transposed_geometry(s) is None:
            return self.unfold_grad(t) + [t.contract("weight_scale", {"G": "GU"}),
                                          t.contract("weight_grad", {"U": "X"})]
        gu = Tensor("Gu", s.output_indices)
        scale = Einsum((Tensor("u", (s.batch,)), self._g(t)), gu)
        scale_cls = Einsum((Tensor("u", ("n",)), self._real(t, "G")), self._real(t, "Gu"))
        w = t.contract("weight_grad")
        return [Contract(gu, scale.operands, scale_cls.flops(class_size), scale_cls.out_size(class_size)),
                ConvTransposeWeightGrad(w.out, (self._x(t), gu), w.flops, w.size)]

    def scaled_input(self, t):
        """u scales X (m N_g N_I N_C) instead of G (m N_g N_Vr N_O), then the same weight gradient:
        cheaper when the input is smaller than the output, as in an upsampling layer."""
        s = t.spec
        if transposed_geometry(s) is None:
            return []
        scale = t.contract("input_scale", {"U": "X"})
        w = t.contract("weight_grad")
        return [scale, ConvTransposeWeightGrad(w.out, (scale.out, self._g(t)), w.flops, w.size)]


KINDS: dict[str, OperandKind] = {k.name: k for k in (InputKind(), OnesKind(), OneHotKind())}
OUTPUT_MAPS = OutputMapKind()


def kind_of(spec: LayerSpec) -> OperandKind:
    if spec.out_maps:
        return OUTPUT_MAPS
    return KINDS[spec.source]
