"""Binding a spec's axes to tensor shapes: index sizes, and tensors with one dimension per index.

``bind_sizes`` solves ``prod(sizes of an axis's indices) == that dimension`` over the operands
(a grouped axis ``(g ci)`` needs all but one of its sizes known from elsewhere, e.g. ``g`` from the
spec's fixed sizes). ``to_indexed`` reshapes a tensor so that it has one dimension per index (a
variadic axis ``*t`` flattens its dims into one, of size 1 when there are none). ``Shapes`` is a
module's shape inference: its output shape, its terms' index sizes and the (x, gy) check.
"""
from __future__ import annotations

import math

import torch

from tengrad_ir import LayerSpec, kind_of
from tengrad_ir.lru import LRU
from tengrad_ir.notation import Axes, format_axes

from ..errors import ShapeError


def axis_dims(axes: Axes, shape: tuple[int, ...], what: str) -> list[tuple[tuple[str, ...], int]]:
    """Pair each axis with its dimension size; a variadic axis takes what the others leave."""
    variadic = [k for k, a in enumerate(axes) if a[0].startswith("*")]
    fixed = len(axes) - len(variadic)
    if (variadic and len(shape) < fixed) or (not variadic and len(shape) != fixed):
        raise ShapeError(f"{what} has shape {tuple(shape)}, expected {format_axes(axes)!r} "
                         f"({'at least ' if variadic else ''}{fixed} dims)")
    out, pos = [], 0
    for axis in axes:
        if axis[0].startswith("*"):
            take = len(shape) - fixed
            out.append(((axis[0][1:],), math.prod(shape[pos:pos + take])))
            pos += take
        else:
            out.append((axis, shape[pos]))
            pos += 1
    return out


def bind_sizes(spec: LayerSpec, operands: list[tuple[Axes, tuple[int, ...], str]]) -> dict[str, int]:
    """Index sizes from ``(axes, shape, what)`` triples and the spec's fixed sizes."""
    sizes = dict(spec.sizes)
    constraints = [(axis, dim, what) for axes, shape, what in operands for axis, dim in axis_dims(axes, shape, what)]
    changed = True
    while changed:
        changed = False
        for axis, dim, what in constraints:
            names = [n.lstrip("*") for n in axis]
            unknown = [n for n in names if n not in sizes]
            known = math.prod(sizes[n] for n in names if n in sizes)
            if len(unknown) == 1:
                if known == 0 or dim % known:
                    raise ShapeError(f"{what}: dimension {dim} of axis {format_axes((axis,))!r} is not "
                                     f"divisible by {known}")
                sizes[unknown[0]] = dim // known
                changed = True
            elif not unknown and known != dim:
                detail = ", ".join(f"{n}={sizes[n]}" for n in names)
                raise ShapeError(f"{what}: axis {format_axes((axis,))!r} has size {dim}, expected {known} ({detail})")
    missing = [i for i in spec.roles if i not in sizes]
    if missing:
        raise ShapeError(f"{spec.name}: cannot infer the size of index {missing[0]!r} from the shapes")
    return sizes


def to_indexed(t: torch.Tensor, axes: Axes, sizes: dict[str, int], what: str) -> torch.Tensor:
    """``t`` reshaped to one dimension per index of ``axes`` (in order)."""
    dims = axis_dims(axes, tuple(t.shape), what)
    return t.reshape([sizes[n.lstrip("*")] for axis, _ in dims for n in axis])


#: output shapes kept per module, one per input shape and dtype (least recently used go first)
OUTPUTS_KEPT = 128


class Shapes:
    """Shape inference for one module: the output shape of ``module(x)`` (on the meta device,
    cached per input shape and dtype), index sizes per term, and the check of (x, gy)."""

    def __init__(self, module: torch.nn.Module, name: str, terms):
        self.module, self.name, self.terms = module, name, terms
        self.integer_ids = any(kind_of(t.spec).integer_ids for t in terms)
        self._out = LRU(OUTPUTS_KEPT)     # {(x.shape, dtype): output shape}, bounded

    def output(self, x: torch.Tensor) -> tuple[int, ...]:
        key = (tuple(x.shape), x.dtype)
        if key not in self._out:
            shape = self._from_spec(tuple(x.shape))
            if shape is not None:
                self._out[key] = shape
                return shape
            # floating tensors on meta in x's dtype (bf16 parameters meet the float32-upcast x);
            # integer buffers (BatchNorm's num_batches_tracked, read by momentum=None) as real copies
            dt = x.dtype if x.is_floating_point() else None
            meta = {k: v.to("meta", dtype=dt) if v.is_floating_point() else v.clone()
                    for k, v in [*self.module.named_parameters(recurse=False),
                                 *self.module.named_buffers(recurse=False)]}
            try:
                with torch.no_grad():
                    y = torch.func.functional_call(self.module, meta, (x.to("meta"),))
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                raise ShapeError(f"{self.name}: input of shape {tuple(x.shape)} is not valid for "
                                 f"{self.module}: {exc}") from None
            self._out[key] = tuple(y.shape)
        return self._out[key]

    def _from_spec(self, x_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The output shape of a torch.nn layer read off a term's spec, without running the module
        on the meta device (about a millisecond per call, most of the cost of planning a new shape):
        the sizes bound from x and the parameter give every output index, a variadic output axis
        ``*t`` takes the dims of the input's ``*t``. None when no term determines it (index maps,
        a pre-map that changes the shape, a user's layer, sizes that do not bind): then the module
        runs on the meta device."""
        if not type(self.module).__module__.startswith("torch.nn."):
            return None
        for t in self.terms:
            s = t.spec
            kind = kind_of(s)
            x_axes = kind.x_axes(s)
            param = getattr(self.module, t.param, None)
            if (x_axes is None or s.maps or s.out_maps or not isinstance(param, torch.Tensor)
                    or (t.pre_map is not None and not t.pre_map_keeps_shape and not kind.integer_ids)):
                continue
            try:
                sizes = bind_sizes(s, [(x_axes, x_shape, "input"), (s.param_axes, tuple(param.shape), "param")])
            except ShapeError:
                return None
            fixed = sum(1 for a in x_axes if not a[0].startswith("*"))
            variadic, pos = {}, 0
            for axis in x_axes:
                take = len(x_shape) - fixed if axis[0].startswith("*") else 1
                if axis[0].startswith("*"):
                    variadic[axis[0][1:]] = tuple(x_shape[pos:pos + take])
                pos += take
            out: list[int] = []
            for axis in s.output_axes:
                if axis[0].startswith("*"):
                    if axis[0][1:] not in variadic:
                        break
                    out += variadic[axis[0][1:]]
                elif all(n in sizes for n in axis):
                    out.append(math.prod(sizes[n] for n in axis))
                else:
                    break
            else:
                return tuple(out)
        return None

    def check(self, x: torch.Tensor, gy: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not isinstance(gy, torch.Tensor):
            raise ShapeError(f"{self.name}: x and gy must be tensors")
        if not gy.is_floating_point():
            raise ShapeError(f"{self.name}: gy must be floating point, got {gy.dtype}")
        if self.integer_ids and x.dtype not in (torch.int64, torch.int32):
            raise ShapeError(f"{self.name}: input must hold integer ids, got {x.dtype}")
        if not self.integer_ids and x.dtype != gy.dtype:
            raise ShapeError(f"{self.name}: x has dtype {x.dtype} but gy has {gy.dtype}; pass both in one dtype")
        if x.dim() == 0 or gy.dim() == 0 or x.shape[0] != gy.shape[0]:
            raise ShapeError(f"{self.name}: x {tuple(x.shape)} and gy {tuple(gy.shape)} need the same "
                             "leading batch dimension")
        expected = self.output(x)
        if tuple(gy.shape) != expected and not self._output_map_sizes_only(tuple(gy.shape), expected):
            raise ShapeError(f"{self.name}: gy has shape {tuple(gy.shape)}, expected {expected} "
                             f"(the shape of module(x) for x of shape {tuple(x.shape)})")

    def _output_map_sizes_only(self, got: tuple[int, ...], expected: tuple[int, ...]) -> bool:
        """Whether ``got`` differs from ``expected`` only along output dims that carry an output-map
        target (a transposed convolution's spatial dims, which ``output_size=`` in its forward sets):
        the maps read G wherever it lies, so any size of those dims gives the layer of that output
        size. Batch, channels and every other dim must still match."""
        if len(got) != len(expected):
            return False
        free: set[int] = set()
        for t in self.terms:
            axes = t.spec.output_axes
            if not t.spec.out_maps or any(a[0].startswith("*") for a in axes) or len(axes) != len(got):
                continue
            free |= {d for d, axis in enumerate(axes) if set(axis) & set(t.spec.out_map_of)}
        return bool(free) and all(g == e or (d in free and g >= 1) for d, (g, e) in enumerate(zip(got, expected)))

    def term_sizes(self, term, x_shape, y_shape, param_shape) -> dict[str, int]:
        """Index sizes of one term from the (pre-mapped) input, output and parameter shapes."""
        s = term.spec
        kind = kind_of(s)
        ops = [(s.output_axes, y_shape, f"{self.name} output gradient"),
               (s.param_axes, param_shape, f"{self.name}.{term.param}")]
        x_axes = kind.x_axes(s)
        if x_axes is not None:
            if term.pre_map is not None and not kind.integer_ids and not term.pre_map_keeps_shape:
                x_shape = tuple(term.pre_map(torch.empty(x_shape, device="meta")).shape)
            ops.append((x_axes, tuple(x_shape), f"{self.name} input" + (" (after pre-map)" if term.pre_map else "")))
        return bind_sizes(s, ops)

    def bind(self, term, sizes: dict[str, int], x: torch.Tensor, gy: torch.Tensor, magnitudes: bool = False):
        """(X, G) of one term: X pre-mapped with one dim per ``kind.x_indices`` (None: not read).
        ``magnitudes``: |X| and |G|, X's magnitude taken after the pre-map (|x_hat| of a norm layer, not
        x_hat(|x|); an index map commutes with it)."""
        s = term.spec
        x_axes = kind_of(s).x_axes(s)
        xt = None
        if magnitudes:
            gy = gy.abs()
        if x_axes is not None:
            xt = term.pre_map(x) if term.pre_map is not None else x
            xt = xt.abs() if magnitudes and xt.is_floating_point() else xt
            xt = to_indexed(xt, x_axes, sizes, f"{self.name} input")
        return xt, to_indexed(gy, s.output_axes, sizes, f"{self.name} output gradient")
