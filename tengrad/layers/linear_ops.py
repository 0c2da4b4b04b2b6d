"""Ops that are linear in a parameter, as einsums: what the op-level capture records for calls that are
no ``torch.nn`` layer (capture/linear_uses.py turns the result into a ``SpecShell`` plan).

Every op here, called with one parameter operand W (the parameter itself or a view of it: a slice,
``cls_token.expand(B, -1, -1)``, ``pos[:, :T]``), is written as

    y[out...] = sum  U[u...] W[w...]   (+ the same for a bias operand: y[out...] += b[b...])

with one letter per dimension. ``LinearCall`` holds U (``x``, the other operand as the op reads it, or
the derivative dy/dW of an elementwise op), the letters of U and y, and per parameter operand its
tensor, the shape it is read in (``shape``: the operand reshaped so that each dim has its letter) and
its letters. The per-sample Jacobian row of sample i is then ``J_i = sum_{u \\ w} U_i gy_i``, exact.

* matmul family: ``torch.mm`` ``ij,jk->ik``, ``torch.bmm`` ``bij,bjk->bik``, ``torch.matmul`` /
  ``@`` with a 2-D parameter on either side (``...ij,jk->...ik``), ``torch.addmm`` / ``torch.baddbmm``
  (their ``input`` a bias broadcast over the product, ``alpha`` folded into U; a parameter bias needs
  ``beta == 1``), ``F.bilinear`` (U = the outer product ``x1_i x2_j``: ``...ij,kij->...k``) and
  ``torch.einsum`` with two operands (implicit output and ``...`` included; a letter of U alone is summed
  into U first, a letter of W alone is refused: no spec holds it).
* elementwise with broadcasting, the parameter on either side: ``x * w`` (U = x), ``x / w`` (U =
  -x / w^2), ``w / x`` (U = 1 / x), ``x + w``, ``x - w``, ``w - x`` (U = +-alpha), and placing a
  parameter into the activations, ``w.expand(...)`` / ``expand_as`` / ``broadcast_to`` (U = 1). U is
  broadcast to y's shape (a view), W's letters are y's dims where W is not broadcast.

Anything else (both operands parameters, an integer or complex op, a rounding division) is not a
use: ``analyze`` returns None and the parameter keeps the damped identity unless another op reads it.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from numbers import Number
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Tensor_ = torch.Tensor


@dataclass
class Operand:
    """One parameter operand: ``tensor`` (as the op reads it), read as ``tensor.reshape(shape)`` with
    ``letters`` (one per dim of that shape); ``source`` "input" (contracted with U) or "ones" (a bias)."""

    tensor: Tensor
    shape: tuple[int, ...]
    letters: str
    source: str = "input"


@dataclass
class LinearCall:
    x: Tensor                 # U, detached
    x_letters: str
    out_letters: str
    operands: list[Operand] = field(default_factory=list)
    source: Tensor | None = None     # the activation operand as the op read it (its views tell provenance)
    source_letters: str = ""


def _letters(k: int, used: str = "") -> str:
    free = [c for c in string.ascii_lowercase if c not in used]
    return "".join(free[:k])


def _const(value, like: Tensor, shape) -> Tensor:
    return torch.full((), float(value), dtype=like.dtype, device=like.device).expand(shape)


def _aligned(w: Tensor, out: Tensor, out_letters: str) -> tuple[tuple[int, ...], str] | None:
    """W broadcast to y: the shape and letters of W's dims that are not broadcast (y's letters)."""
    if w.dim() > out.dim():
        return None
    shift = out.dim() - w.dim()
    shape, letters = [], ""
    for j, s in enumerate(w.shape):
        o = out.shape[shift + j]
        if s == o:
            shape.append(s)
            letters += out_letters[shift + j]
        elif s != 1:
            return None
    return tuple(shape), letters


def elementwise(w: Tensor, u: Tensor, out: Tensor, source=None) -> LinearCall | None:
    """y = U * W (broadcast) with U = dy/dW; ``source``: the other operand (a tensor) or None."""
    letters = _letters(out.dim())
    al = _aligned(w, out, letters)
    if al is None:
        return None
    try:
        x = u.detach().expand(out.shape)
    except RuntimeError:
        return None
    src = source if isinstance(source, Tensor) and 0 < source.dim() <= out.dim() else None
    return LinearCall(x, letters, letters, [Operand(w, al[0], al[1])], src,
                      letters[out.dim() - src.dim():] if src is not None else "")


def _number(a) -> bool:
    return isinstance(a, Number) and not isinstance(a, bool)


def _binary(kind: str, reverse: bool = False) -> Callable:
    """The analyser of ``a (op) b`` (``reverse``: Tensor.__rop__(self, other) = other (op) self)."""
    def analyse(is_param, out, args, kwargs):
        if len(args) < 2:
            return None
        a, b = (args[1], args[0]) if reverse else (args[0], args[1])
        alpha = kwargs.get("alpha", 1)
        if kind == "div" and kwargs.get("rounding_mode") is not None:
            return None
        pa, pb = is_param(a), is_param(b)
        if pa == pb:
            return None
        w, o = (a, b) if pa else (b, a)
        if not (isinstance(o, Tensor) or _number(o)):
            return None
        if isinstance(o, Tensor) and not o.is_floating_point():
            return None
        ov = o.detach() if isinstance(o, Tensor) else o
        if kind == "mul":
            u = ov if isinstance(ov, Tensor) else _const(ov, out, ())
        elif kind == "add":
            u = _const(1 if pa else alpha, out, ())
        elif kind == "sub":
            u = _const(1 if pa else -alpha, out, ())
        elif kind == "div":
            wv = w.detach()
            u = 1 / ov if pa else -ov / (wv * wv)
            if not isinstance(u, Tensor):
                u = _const(u, out, ())
        else:
            return None
        return elementwise(w, u, out, o)
    return analyse


def _expand(is_param, out, args, kwargs):
    w = args[0] if args else None
    if not is_param(w):
        return None
    return elementwise(w, _const(1, out, ()), out)


def contraction(x: Tensor, xl: str, w: Tensor, wl: str, ol: str, out: Tensor,
                bias: Tensor | None = None) -> LinearCall | None:
    """y[ol] = sum U[xl] W[wl] (+ bias broadcast to y) as a LinearCall: letters of U alone are summed
    into U; a repeated letter or a letter of W alone is refused (None)."""
    if len(set(xl)) != len(xl) or len(set(wl)) != len(wl) or len(set(ol)) != len(ol):
        return None
    if any(c not in ol and c not in xl for c in wl) or any(c not in xl and c not in wl for c in ol):
        return None
    source, sl = x, xl
    x = x.detach()
    alone = [k for k, c in enumerate(xl) if c not in ol and c not in wl]
    if alone:
        x = x.sum(dim=alone)
        xl = "".join(c for k, c in enumerate(xl) if k not in alone)
    call = LinearCall(x, xl, ol, [Operand(w, tuple(w.shape), wl)], source, sl)
    if bias is not None:
        al = _aligned(bias, out, ol)
        if al is None:
            return None
        call.operands.append(Operand(bias, al[0], al[1], "ones"))
    return call


def _two_operands(is_param, a, b, al, bl, ol, out, bias=None, alpha=1):
    pa, pb = is_param(a), is_param(b)
    if pa == pb or not isinstance(a, Tensor) or not isinstance(b, Tensor):
        return None
    if not (a.is_floating_point() and b.is_floating_point()):
        return None
    x, xl, w, wl = (b, bl, a, al) if pa else (a, al, b, bl)
    if alpha != 1:
        x = x.detach() * alpha
    return contraction(x, xl, w, wl, ol, out, bias)


def _mm(is_param, out, args, kwargs):
    if len(args) < 2:
        return None
    return _two_operands(is_param, args[0], args[1], "ij", "jk", "ik", out)


def _bmm(is_param, out, args, kwargs):
    if len(args) < 2:
        return None
    return _two_operands(is_param, args[0], args[1], "bij", "bjk", "bik", out)


def _matmul(reverse=False):
    def analyse(is_param, out, args, kwargs):
        if len(args) < 2:
            return None
        a, b = (args[1], args[0]) if reverse else (args[0], args[1])
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return None
        if is_param(b) and b.dim() == 2 and a.dim() >= 2:
            lead = _letters(a.dim() - 2, "ijk")
            return _two_operands(is_param, a, b, lead + "ij", "jk", lead + "ik", out)
        if is_param(a) and a.dim() == 2 and b.dim() >= 2:
            lead = _letters(b.dim() - 2, "ijk")
            return _two_operands(is_param, a, b, "ij", lead + "jk", lead + "ik", out)
        return None
    return analyse


def _add_product(letters):
    al, bl, ol = letters

    def analyse(is_param, out, args, kwargs):
        names = ("input", "mat1", "mat2") if len(ol) == 2 else ("input", "batch1", "batch2")
        vals = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]):]]
        if len(vals) < 3 or any(v is None for v in vals):
            return None
        bias, a, b = vals
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        if is_param(bias):
            if beta != 1:
                return None
            if not (is_param(a) or is_param(b)):
                return elementwise(bias, _const(1, out, ()), out)
            return _two_operands(is_param, a, b, al, bl, ol, out, bias=bias, alpha=alpha)
        return _two_operands(is_param, a, b, al, bl, ol, out, alpha=alpha)
    return analyse


def _bilinear(is_param, out, args, kwargs):
    vals = list(args[:4]) + [kwargs.get(n) for n in ("input1", "input2", "weight", "bias")[len(args[:4]):]]
    x1, x2, w, b = (vals + [None] * 4)[:4]
    if not (isinstance(x1, Tensor) and isinstance(x2, Tensor) and is_param(w)) or is_param(x1) or is_param(x2):
        return None
    if b is not None and not is_param(b):
        return None
    lead = _letters(x1.dim() - 1, "ijk")
    u = torch.einsum("...i,...j->...ij", x1.detach(), x2.detach())
    call = contraction(u, lead + "ij", w, "kij", lead + "k", out, bias=b)
    if call is not None:
        call.source, call.source_letters = x1, lead + "i"
    return call


def _einsum(is_param, out, args, kwargs):
    if not args or not isinstance(args[0], str):
        return None
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    if len(ops) != 2 or not all(isinstance(t, Tensor) for t in ops):
        return None
    parsed = parse_einsum(args[0], [t.dim() for t in ops])
    if parsed is None:
        return None
    (al, bl), ol = parsed
    return _two_operands(is_param, ops[0], ops[1], al, bl, ol, out)


def parse_einsum(equation: str, ranks: list[int]) -> tuple[list[str], str] | None:
    """``"btd,de->bte"`` (spaces, implicit output and ``...`` allowed) as one letter per dim of each
    operand and of the output; None for what is not a plain two-operand einsum."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        return None
    used = set(eq) - set(".,->")
    if not all(c.isalpha() for c in used):
        return None
    ell_rank = max((r - len(t.replace("...", "")) for t, r in zip(terms, ranks) if "..." in t), default=0)
    ell = "".join(c for c in string.ascii_letters if c not in used)[:ell_rank]
    out_terms = []
    for t, r in zip(terms, ranks):
        if "..." in t:
            k = r - len(t.replace("...", ""))
            t = t.replace("...", ell[ell_rank - k:] if k else "")
        if len(t) != r:
            return None
        out_terms.append(t)
    if arrow:
        rhs = rhs.replace("...", ell)
    else:
        counts = {c: sum(t.count(c) for t in out_terms) for c in set("".join(out_terms))}
        rhs = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    return out_terms, rhs


ANALYSERS: dict[Callable, Callable] = {}
for _f in (Tensor_.__mul__, Tensor_.__rmul__, Tensor_.mul, torch.mul):
    ANALYSERS[_f] = _binary("mul")
for _f in (Tensor_.__add__, Tensor_.__radd__, Tensor_.add, torch.add):
    ANALYSERS[_f] = _binary("add")
for _f in (Tensor_.__sub__, Tensor_.sub, torch.sub):
    ANALYSERS[_f] = _binary("sub")
ANALYSERS[Tensor_.__rsub__] = _binary("sub", reverse=True)
for _f in (Tensor_.__truediv__, Tensor_.div, torch.div, torch.true_divide):
    ANALYSERS[_f] = _binary("div")
ANALYSERS[Tensor_.__rtruediv__] = _binary("div", reverse=True)
for _f in (Tensor_.expand, Tensor_.expand_as, Tensor_.broadcast_to, torch.broadcast_to):
    ANALYSERS[_f] = _expand
for _f in (torch.mm, Tensor_.mm):
    ANALYSERS[_f] = _mm
for _f in (torch.bmm, Tensor_.bmm):
    ANALYSERS[_f] = _bmm
for _f in (torch.matmul, Tensor_.matmul, Tensor_.__matmul__):
    ANALYSERS[_f] = _matmul()
ANALYSERS[Tensor_.__rmatmul__] = _matmul(reverse=True)
ANALYSERS[torch.addmm] = _add_product(("ij", "jk", "ik"))
ANALYSERS[torch.baddbmm] = _add_product(("bij", "bjk", "bik"))
ANALYSERS[F.bilinear] = _bilinear
ANALYSERS[torch.einsum] = _einsum


def analyze(func: Callable, is_param: Callable[[object], bool], out, args: tuple, kwargs: dict) -> LinearCall | None:
    """The op call as a ``LinearCall`` (module docstring), or None when it is not linear in one parameter."""
    fn = ANALYSERS.get(func)
    if fn is None or not isinstance(out, Tensor) or not out.is_floating_point():
        return None
    return fn(is_param, out, args, kwargs)
