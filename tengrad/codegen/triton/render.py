"""Render a term's spec and sizes into Triton source by filling the named holes of ``templates``.

The role classes flatten every term to four index classes (the roles of tengrad_ir/spec.py; paper,
Appendix A.2)::

    G[n, g, v, C]      U[n, g, C, I]      p[g, v, I]      J[n, g, v, I]

with ``g`` the group indices, ``v`` the free, ``I`` the independent and ``C`` the common ones
(``spec.indices(role)``), each class flattened row-major. Inside a kernel a flat class index is
decomposed by div/mod into the spec's indices, the unfolding maps are printed from sympy as
address arithmetic (``ih = 1*oh + 1*kh - 1``) with their bounds as load masks (zero padding), and
the address is the sum of coordinate times stride of the *raw* tensor. Every size except the batch
size is a literal of the generated source, so one module serves one (spec, sizes) for any m.

``render(spec, sizes, ...)`` returns the module source; ``TermLayout`` holds the flattening that
the launcher (``run.py``) shares.
"""
from __future__ import annotations

import keyword
import math
from dataclasses import dataclass
from functools import cached_property
from string import Template

from tengrad_ir import LayerSpec, kind_of

from ...errors import TengradError
from .templates import TEMPLATES

# Names the helpers use for themselves; an index with one of these names is renamed idx_<name>.
_RESERVED = {"x_ptr", "g_ptr", "p_ptr", "sample", "s1", "s2", "g", "v", "c", "i", "c1", "c2", "full",
             "off", "mask", "ids", "ida", "idb", "hot", "acc", "ut", "pt", "ua", "ub", "i_first", "tl", "triton", "ACC",
             "mm", "range", "u_tile", "g_tile", "p_offsets", "ids_at", "c1_tile", "y_tile"}
INDENT = "    "


def contiguous_strides(indices: tuple[str, ...], sizes: dict[str, int]) -> dict[str, int]:
    """Row-major strides of a tensor with one dimension per index."""
    strides, step = {}, 1
    for idx in reversed(indices):
        strides[idx] = step
        step *= sizes[idx]
    return strides


@dataclass(frozen=True)
class TermLayout:
    """The class flattening of one term at fixed (non-batch) sizes."""

    spec: LayerSpec
    sizes: tuple[tuple[str, int], ...]

    @cached_property
    def size(self) -> dict[str, int]:
        return dict(self.sizes)

    @cached_property
    def classes(self) -> dict[str, tuple[str, ...]]:
        s = self.spec
        return {"g": s.indices("group"), "v": s.indices("free"), "I": s.indices("independent"),
                "C": s.indices("common")}

    def n(self, cls: str) -> int:
        return math.prod(self.size[i] for i in self.classes[cls])

    @cached_property
    def x_idx(self) -> tuple[str, ...]:
        """Dims of the input tensor the kernels read (ids for one-hot, nothing for ones)."""
        return kind_of(self.spec).x_indices(self.spec)

    @property
    def g_idx(self) -> tuple[str, ...]:
        return self.spec.output_indices

    @property
    def p_idx(self) -> tuple[str, ...]:
        return self.spec.param_indices

    @cached_property
    def n_params(self) -> int:
        return math.prod(self.size[i] for i in self.p_idx)

    def strides(self, which: str) -> dict[str, int]:
        """Strides of the contiguous x / g / p tensors; the batch stride is the per-sample size."""
        idx = {"x": self.x_idx, "g": self.g_idx, "p": self.p_idx}[which]
        sizes = dict(self.size)
        sizes[self.spec.batch] = 1
        return contiguous_strides(idx, sizes)


def name(index: str) -> str:
    """The kernel variable of an index coordinate (its own name unless that is reserved)."""
    return f"idx_{index}" if index in _RESERVED or keyword.iskeyword(index) else index


def coordinates(flat: str, indices: tuple[str, ...], sizes: dict[str, int]) -> list[str]:
    """Lines decomposing the flat class index ``flat`` row-major into ``indices`` (div/mod)."""
    lines, div = [], 1
    for k, idx in enumerate(reversed(indices)):
        expr = flat if div == 1 else f"({flat} // {div})"
        if k != len(indices) - 1:  # the slowest index needs no modulo (out-of-range lanes are masked)
            expr = f"{expr} % {sizes[idx]}"
        lines.append(f"{name(idx)} = {expr}")
        div *= sizes[idx]
    return lines[::-1]


def map_expression(mp, roles: dict[str, str]) -> str:
    """``ih = s*oh + d*kh + c`` printed from the map's sympy coefficients, e.g. ``1*oh + 1*kh - 1``."""
    order = sorted(mp.coeffs, key=lambda var: roles.get(var) != "common")  # output position first
    terms = [f"{mp.coeffs[var]}*{name(var)}" for var in order]
    off = mp.offset
    text = " + ".join(terms) if terms else "0"
    if off:
        text += f" {'-' if off < 0 else '+'} {abs(off)}"
    return text


def address(sample: str | None, indices: tuple[str, ...], strides: dict[str, int], batch: str) -> str:
    parts = []
    for idx in indices:
        st = strides[idx]
        var = sample if idx == batch else name(idx)
        if var is None:
            continue
        parts.append(var if st == 1 else f"{var} * {st}")
    return " + ".join(parts) if parts else "0"


class Renderer:
    """Fills the holes of the templates for one ``TermLayout``."""

    def __init__(self, layout: TermLayout, acc: str = "tl.float32", precision: str | None = "ieee",
                 interpret: bool = False):
        self.lay, self.acc, self.precision, self.interpret = layout, acc, precision, interpret
        self.spec = layout.spec
        s = self.spec
        if s.source == "one_hot":
            if layout.classes["I"] != (s.one_hot,):
                raise TengradError(f"{s.name}: the triton backend needs the one-hot index {s.one_hot!r} to be "
                                   f"the only independent index (got {layout.classes['I']})")
            if any(s.roles[i] not in ("batch", "group", "common") for i in layout.x_idx):
                raise TengradError(f"{s.name}: the triton backend needs one-hot ids indexed by batch, group "
                                   "and common indices only")

    # ------------------------------------------------------------------ pieces
    def _class_lines(self, cls: str, flat: str) -> list[str]:
        idx = self.lay.classes[cls]
        if not idx:
            return []
        label = {"g": "group", "v": "free", "I": "independent", "C": "common"}[cls]
        return [f"# {label} {cls} = ({' '.join(idx)})  [N_{cls} = {self.lay.n(cls)}]"] + \
            coordinates(flat, idx, self.lay.size)

    def _bounds(self, pairs) -> str:
        return " & ".join(f"({flat} < {self.lay.n(cls)})" for cls, flat in pairs)

    @staticmethod
    def _body(lines: list[str]) -> str:
        return "\n".join(INDENT + line for line in lines)

    # ------------------------------------------------------------------ holes
    def u_tile(self) -> str:
        s, lay = self.spec, self.lay
        lines = ["full = c * 0 + i * 0  # the tile's (broadcast) shape"]
        lines += self._class_lines("g", "g") + self._class_lines("C", "c") + self._class_lines("I", "i")
        mask = self._bounds((("C", "c"), ("I", "i")))
        if s.source == "ones":
            lines.append(f"mask = {mask}")
            lines.append("return tl.where(mask, 1.0, 0.0).to(ACC)")
        elif s.source == "one_hot":
            lines.append("ids = ids_at(x_ptr, sample, g, c)")
            lines.append(f"mask = {mask} & (ids == {name(s.one_hot)})  # one-hot: U = [ids == {s.one_hot}]")
            lines.append("return tl.where(mask, 1.0, 0.0).to(ACC)")
        else:
            if s.maps:
                lines.append("# index maps (the unfolding, read in place: no unfolded input is stored)")
            for mp in s.maps:
                lines.append(f"{name(mp.target)} = {map_expression(mp, s.roles)}")
                mask += f" & ({name(mp.target)} >= 0) & ({name(mp.target)} < {lay.size[mp.target]})"
            lines.append(f"mask = {mask}")
            off = address("sample", lay.x_idx, lay.strides("x"), s.batch)
            lines.append(f"off = full + {off}")
            lines.append("return tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)")
        return self._body(lines)

    def g_tile(self) -> str:
        s, lay = self.spec, self.lay
        lines = ["full = v * 0 + c * 0  # the tile's (broadcast) shape"]
        lines += self._class_lines("g", "g") + self._class_lines("v", "v") + self._class_lines("C", "c")
        lines.append(f"mask = {self._bounds((('v', 'v'), ('C', 'c')))}")
        lines.append(f"off = full + {address('sample', lay.g_idx, lay.strides('g'), s.batch)}")
        lines.append("return tl.load(g_ptr + off, mask=mask, other=0.0).to(ACC)")
        return self._body(lines)

    def p_offsets(self) -> str:
        s, lay = self.spec, self.lay
        lines = ["full = v * 0 + i * 0  # the tile's (broadcast) shape"]
        lines += self._class_lines("g", "g") + self._class_lines("v", "v") + self._class_lines("I", "i")
        lines.append(f"mask = {self._bounds((('v', 'v'), ('I', 'i')))} & (i >= 0)")
        lines.append(f"off = full + {address(None, lay.p_idx, lay.strides('p'), s.batch)}")
        lines.append("return off, mask")
        return self._body(lines)

    def ids_at(self) -> str:
        s, lay = self.spec, self.lay
        if s.source != "one_hot":
            return self._body([f"return c * 0 - 1  # unused: the input of {s.name} is {s.source!r}"])
        lines = self._class_lines("g", "g") + self._class_lines("C", "c")
        lines.append(f"off = c * 0 + {address('sample', lay.x_idx, lay.strides('x'), s.batch)}")
        lines.append(f"return tl.load(x_ptr + off, mask={self._bounds((('C', 'c'),))}, other=-1)")
        return self._body(lines)

    def c1_tile(self) -> str:
        s, lay = self.spec, self.lay
        n_c = lay.n("C")
        if s.source == "ones":
            lines = [f"return tl.where((c1[:, None] < {n_c}) & (c2[None, :] < {n_c}), 1.0, 0.0).to(ACC)  # U = 1"]
        elif s.source == "one_hot":
            lines = ["ida = ids_at(x_ptr, s1, g, c1[:, None])",
                     "idb = ids_at(x_ptr, s2, g, c2[None, :])",
                     "return tl.where((ida == idb) & (ida >= 0), 1.0, 0.0).to(ACC)  # one-hot: C1 = [ids == ids']"]
        else:
            lines = ["acc = tl.zeros((BLOCK_C, BLOCK_C), ACC)",
                     f"for i_first in range(0, {lay.n('I')}, BLOCK_I):",
                     INDENT + "i = i_first + tl.arange(0, BLOCK_I)",
                     INDENT + "ua = u_tile(x_ptr, s1, g, c1[:, None], i[None, :])  # [BLOCK_C, BLOCK_I]",
                     INDENT + "ub = u_tile(x_ptr, s2, g, c2[:, None], i[None, :])",
                     INDENT + "acc += mm(ua, tl.trans(ub))",
                     "return acc"]
        return self._body(lines)

    def y_tile(self) -> str:
        s, lay = self.spec, self.lay
        if s.source == "one_hot":
            lines = ["ids = ids_at(x_ptr, sample, g, c[:, None])  # [BLOCK_C, 1]",
                     "off, mask = p_offsets(g, v[None, :], ids)  # rows of p gathered at the ids",
                     "return tl.load(p_ptr + off, mask=mask, other=0.0).to(ACC)"]
        else:
            lines = ["acc = tl.zeros((BLOCK_C, BLOCK_V), ACC)",
                     f"for i_first in range(0, {lay.n('I')}, BLOCK_I):",
                     INDENT + "i = i_first + tl.arange(0, BLOCK_I)",
                     INDENT + "ut = u_tile(x_ptr, sample, g, c[:, None], i[None, :])  # [BLOCK_C, BLOCK_I]",
                     INDENT + "off, mask = p_offsets(g, v[None, :], i[:, None])  # [BLOCK_I, BLOCK_V]",
                     INDENT + "pt = tl.load(p_ptr + off, mask=mask, other=0.0).to(ACC)",
                     INDENT + "acc += mm(ut, pt)",
                     "return acc"]
        return self._body(lines)

    def plan_text(self) -> str:
        s, lay = self.spec, self.lay
        lines = [f"term {s.name}:  {s.describe()}",
                 f"roles: {s.roles_line()}",
                 "classes: " + ", ".join(f"{c} = ({' '.join(lay.classes[c]) or '-'}) N_{c}={lay.n(c)}"
                                         for c in ("g", "v", "I", "C")),
                 "sizes: " + ", ".join(f"{k}={v}" for k, v in lay.sizes),
                 f"layouts: x[{' '.join(lay.x_idx) or '-'}]  G[{' '.join(lay.g_idx)}]  "
                 f"p[{' '.join(lay.p_idx)}]  J[{s.batch} {' '.join(lay.p_idx)}]  (contiguous)"]
        return "\n".join(lines)

    # ------------------------------------------------------------------ the module
    def render(self) -> str:
        from .configs import configs

        lay = self.lay
        dot_kwargs = f', input_precision="{self.precision}"' if self.precision else ""
        cfg = configs(lay, self.interpret)
        consts = {"N_G": lay.n("g"), "N_V": lay.n("v"), "N_I": lay.n("I"), "N_C": lay.n("C")}
        parts = [
            Template(TEMPLATES["header"]).substitute(
                plan=self.plan_text(), acc=self.acc, dot_kwargs=dot_kwargs,
                jacobian_configs=cfg["jacobian"], gemm_configs=cfg["gemm"],
                factored_configs=cfg["factored"], forward_configs=cfg["forward"]),
            Template(TEMPLATES["operands"]).substitute(
                u_source={"input": "read through the index maps", "ones": "ones",
                          "one_hot": f"one-hot ids along {self.spec.one_hot}"}[self.spec.source],
                p_layout=" ".join(lay.p_idx), u_tile_body=self.u_tile(), g_tile_body=self.g_tile(),
                p_offsets_body=self.p_offsets(), ids_at_body=self.ids_at(), c1_tile_body=self.c1_tile(),
                y_tile_body=self.y_tile()),
        ]
        for kernel in ("jacobian", "gemm_nt", "gram_factored", "jvp_forward"):
            parts.append(Template(TEMPLATES[kernel]).substitute(consts))
        return "".join(parts)


def render(spec: LayerSpec, sizes: dict[str, int], acc: str = "tl.float32", precision: str | None = "ieee",
           interpret: bool = False) -> str:
    """Triton source for ``spec`` at ``sizes`` (the batch size is ignored: it stays a kernel argument)."""
    layout = TermLayout(spec, tuple(sorted((k, v) for k, v in sizes.items() if k != spec.batch)))
    return Renderer(layout, acc, precision, interpret).render()
