"""``LayerSpec``: a layer that is linear in its parameter, declared in index notation.

    Y[n, out...] = sum  U[n, in...] * W[param...]        (one einsum; paper, Lemma 1)

``U`` is the *unfolded* input: the layer's input (after an optional pre-map that touches the input
only, paper Remark 1) read through the affine index maps, e.g. for conv2d
``U[n, g, ci, kh, kw, oh, ow] = X[n, g, ci, sh*oh + dh*kh - ph, sw*ow + dw*kw - pw]``.
The An index map may instead sit on an *output* index (a transposed convolution,
``o = s*i + d*k - p`` with i an input index and k a parameter index): then the output gradient is
read through the map, ``GU[n, .., i, k] = G[n, .., s*i + d*k - p]`` (zero outside ``[0, N_o)``), and the
roles follow from the *unfolded output* indices (i common, k free: it sits with the parameter).
The ``source`` says where the input comes from: ``"input"`` (the module input), ``"ones"`` (a bias:
U is all ones) or ``"one_hot"`` (an embedding: the input holds integer ids and U is their one-hot
code along the index ``one_hot``, never materialised).

Roles (paper, Appendix A.2, plus *group*) follow from where an index appears:

=========== =========================== ==========================
role        appears in                  conv2d example
=========== =========================== ==========================
batch       U and Y (declared: ``n``)   n
group       U, W and Y                  g
free        W and Y                     co
independent U and W                     ci kh kw
common      U and Y                     oh ow
=========== =========================== ==========================
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from .errors import SpecError
from .index_map import IndexMap
from .notation import Axes, format_axes, indices_of, parse_equation, variadic_of

ROLES = ("batch", "group", "free", "independent", "common")
SOURCES = ("input", "ones", "one_hot")


@dataclass(frozen=True)
class LayerSpec:
    """One term of a layer: the contraction of its (unfolded) input with one parameter.

    Attributes:
        name: label used in messages and plans (e.g. ``"Conv2d.weight"``).
        input_axes, param_axes, output_axes: the three operands' axes (see ``notation``).
        maps: the unfolding maps ``target = affine(indices)`` for input indices.
        out_maps: maps ``target = affine(indices)`` for output indices (the output gradient is
            unfolded through them; a transposed convolution). A spec has maps or out_maps, not both.
        batch: the batch index (must be the first input and output axis).
        sizes: sizes fixed by the layer rather than by tensor shapes (e.g. the group count).
        source: ``"input"``, ``"ones"`` or ``"one_hot"``.
        one_hot: with ``source="one_hot"``, the index that the integer input selects.
        pre_map: name of the input pre-map (the torch side owns the callable), or None.
        roles: an optional declaration ``{index: role}`` checked against the notation.
    """

    name: str
    input_axes: Axes
    param_axes: Axes
    output_axes: Axes
    maps: tuple[IndexMap, ...] = ()
    batch: str = "n"
    sizes: tuple[tuple[str, int], ...] = ()
    source: str = "input"
    one_hot: str | None = None
    pre_map: str | None = None
    roles_declared: tuple[tuple[str, str], ...] = field(default=(), compare=True)
    out_maps: tuple[IndexMap, ...] = ()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def parse(equation: str, *, name: str = "layer", maps: dict[str, str] | None = None,
              constants: dict[str, int] | None = None, batch: str = "n",
              sizes: dict[str, int] | None = None, source: str = "input",
              one_hot: str | None = None, pre_map: str | None = None,
              roles: dict[str, str] | None = None) -> "LayerSpec":
        """Build and validate a spec from ``"input, param -> output"`` notation.

        ``maps`` gives ``{target: "affine expression"}``; symbols in it that are not indices must
        be given in ``constants`` (stride, dilation, padding...).
        """
        operands, output = parse_equation(equation)
        if len(operands) != 2:
            raise SpecError(
                f"{name}: {equation!r} has {len(operands)} operands; a spec that is linear in its "
                "parameter contracts exactly one input with one parameter (input, param -> output)")
        input_axes, param_axes = operands
        known = set(indices_of(input_axes)) | set(indices_of(param_axes)) | set(indices_of(output))
        parsed_maps, out_maps = [], []
        for target, text in (maps or {}).items():
            if target in indices_of(input_axes):
                parsed_maps.append(IndexMap.parse(target, text, known - {target}, constants))
            elif target in indices_of(output) and target not in indices_of(param_axes):
                out_maps.append(IndexMap.parse(target, text, known - {target}, constants))
            else:
                raise SpecError(f"{name}: index map target {target!r} is not an input index of {equation!r} "
                                "(nor an output-only index)")
        if parsed_maps and out_maps:
            raise SpecError(f"{name}: index maps on both input ({parsed_maps[0].target!r}) and output "
                            f"({out_maps[0].target!r}) indices are not supported")
        spec = LayerSpec(name=name, input_axes=input_axes, param_axes=param_axes, output_axes=output,
                         maps=tuple(parsed_maps), out_maps=tuple(out_maps), batch=batch,
                         sizes=tuple(sorted((sizes or {}).items())),
                         source=source, one_hot=one_hot, pre_map=pre_map,
                         roles_declared=tuple(sorted((roles or {}).items())))
        spec.validate()
        return spec

    # ------------------------------------------------------------------ derived index sets
    @cached_property
    def map_of(self) -> dict[str, IndexMap]:
        return {m.target: m for m in self.maps}

    @cached_property
    def raw_input_indices(self) -> tuple[str, ...]:
        """Indices of the raw input tensor (plus the one-hot index for an embedding)."""
        return indices_of(self.input_axes)

    @cached_property
    def unfolded_indices(self) -> tuple[str, ...]:
        """Indices of U: raw input indices with every mapped index replaced by its map's variables."""
        out: list[str] = []
        for idx in self.raw_input_indices:
            for name in (self.map_of[idx].variables if idx in self.map_of else (idx,)):
                if name not in out:
                    out.append(name)
        return tuple(out)

    @cached_property
    def out_map_of(self) -> dict[str, IndexMap]:
        return {m.target: m for m in self.out_maps}

    @cached_property
    def unfolded_output_indices(self) -> tuple[str, ...]:
        """Indices of the unfolded output GU: output indices with every mapped one replaced by its
        map's variables (the output indices themselves when there are no output maps)."""
        out: list[str] = []
        for idx in self.output_indices:
            for name in (self.out_map_of[idx].variables if idx in self.out_map_of else (idx,)):
                if name not in out:
                    out.append(name)
        return tuple(out)

    @cached_property
    def param_indices(self) -> tuple[str, ...]:
        return indices_of(self.param_axes)

    @cached_property
    def output_indices(self) -> tuple[str, ...]:
        return indices_of(self.output_axes)

    @cached_property
    def variadic(self) -> tuple[str, ...]:
        return variadic_of(self.input_axes) + variadic_of(self.output_axes)

    @cached_property
    def roles(self) -> dict[str, str]:
        """``{index: role}`` derived from where each index of U, W, Y appears (Y unfolded through
        the output maps: a mapped output index has no role, its map's variables do)."""
        u, w, y = set(self.unfolded_indices), set(self.param_indices), set(self.unfolded_output_indices)
        roles = {}
        for idx in dict.fromkeys(self.unfolded_indices + self.param_indices + self.unfolded_output_indices):
            where = (idx in u, idx in w, idx in y)
            if idx == self.batch:
                roles[idx] = "batch"
            elif where == (True, True, True):
                roles[idx] = "group"
            elif where == (False, True, True):
                roles[idx] = "free"
            elif where == (True, True, False):
                roles[idx] = "independent"
            elif where == (True, False, True):
                roles[idx] = "common"
            else:
                roles[idx] = "invalid"
        return roles

    def indices(self, role: str) -> tuple[str, ...]:
        """Indices of one role, in order of first appearance."""
        return tuple(i for i, r in self.roles.items() if r == role)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Reject a spec that contradicts itself; every message names the index or map."""
        n = self.name
        if self.source not in SOURCES:
            raise SpecError(f"{n}: unknown source {self.source!r}; valid: {SOURCES}")
        if (self.source == "one_hot") != (self.one_hot is not None):
            raise SpecError(f"{n}: source='one_hot' and one_hot=<index> go together")
        if self.one_hot is not None and self.one_hot not in self.raw_input_indices:
            raise SpecError(f"{n}: one-hot index {self.one_hot!r} is not an input index")
        for axes, what in ((self.input_axes, "input"), (self.output_axes, "output")):
            if not axes or axes[0] != (self.batch,):
                raise SpecError(f"{n}: the batch index {self.batch!r} must be the first {what} axis "
                                f"(got {format_axes(axes)!r})")
        if self.batch in self.param_indices:
            raise SpecError(f"{n}: the batch index {self.batch!r} appears in the parameter")
        for m in self.maps:
            if m.target in self.param_indices or m.target in self.output_indices:
                raise SpecError(f"{n}: mapped index {m.target!r} must appear in the input only")
            for var in m.variables:
                if var in self.map_of:
                    raise SpecError(f"{n}: map {m} uses the mapped index {var!r}")
                if var == self.batch:
                    raise SpecError(f"{n}: map {m} uses the batch index {var!r}")
                if var not in self.param_indices and var not in self.output_indices:
                    raise SpecError(f"{n}: index {var!r} of map {m} appears in neither the parameter "
                                    "nor the output")
        if self.out_maps and self.source != "input":
            raise SpecError(f"{n}: output maps need source='input' (got {self.source!r})")
        for m in self.out_maps:
            if m.target in self.raw_input_indices or m.target in self.param_indices:
                raise SpecError(f"{n}: mapped output index {m.target!r} must appear in the output only")
            for var in m.variables:
                if var in self.out_map_of:
                    raise SpecError(f"{n}: map {m} uses the mapped index {var!r}")
                if var == self.batch:
                    raise SpecError(f"{n}: map {m} uses the batch index {var!r}")
                if var in self.output_indices:
                    raise SpecError(f"{n}: index {var!r} of output map {m} is itself an output index")
                if var not in self.raw_input_indices and var not in self.param_indices:
                    raise SpecError(f"{n}: index {var!r} of output map {m} appears in neither the input "
                                    "nor the parameter")
        u, w, y = set(self.unfolded_indices), set(self.param_indices), set(self.unfolded_output_indices)
        for idx, role in self.roles.items():
            if role != "invalid":
                continue
            if idx in y and idx not in u and idx not in w:
                raise SpecError(f"{n}: index {idx!r} appears only in the output")
            if idx in u and idx not in w and idx not in y:
                raise SpecError(f"{n}: index {idx!r} appears only in the input; sum it in a pre-map")
            raise SpecError(f"{n}: index {idx!r} appears only in the parameter; the layer would "
                            "depend on a sum of parameter entries")
        for idx in self.variadic:
            if self.roles.get(idx) != "common":
                raise SpecError(f"{n}: variadic index {idx!r} must be common (input and output), "
                                f"is {self.roles.get(idx)}")
        for idx, role in self.roles_declared:
            if role not in ROLES:
                raise SpecError(f"{n}: unknown role {role!r} declared for {idx!r}; valid: {ROLES}")
            if idx not in self.roles:
                raise SpecError(f"{n}: role declared for {idx!r}, which the spec does not use")
            if self.roles[idx] != role:
                raise SpecError(f"{n}: index {idx!r} is declared {role} but the notation makes it "
                                f"{self.roles[idx]}")

    # ------------------------------------------------------------------ printing
    def equation(self) -> str:
        return (f"{format_axes(self.input_axes)}, {format_axes(self.param_axes)} -> "
                f"{format_axes(self.output_axes)}")

    def describe(self) -> str:
        from .operand import kind_of  # the kind describes its own input

        parts = [self.equation()]
        if kind_of(self).describe(self):
            parts.append(kind_of(self).describe(self))
        if self.pre_map:
            parts.append(f"(pre-map: {self.pre_map})")
        parts += [f"{m}" for m in self.maps]
        parts += [f"{m}  (output map: G read there)" for m in self.out_maps]
        return "   ".join(parts)

    def roles_line(self) -> str:
        return " | ".join(f"{r} {' '.join(self.indices(r)) or '-'}" for r in ROLES)
