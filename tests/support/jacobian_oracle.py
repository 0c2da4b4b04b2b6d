"""Independent autograd oracle for per-sample Jacobians of one layer (tests only; never imports tengrad).

For a module y = f(x; theta) and per-sample output gradients gy (gy[i] = dl_i/dy_i), row i of
the Jacobian is

    J[i, :] = d/dtheta  < gy[i], f(x[i:i+1]; theta)[0] >            (flattened, concatenated)

over the module's *trainable* parameters (requires_grad=True), in ``module.named_parameters()``
order. Frozen parameters and buffers stay constants. The oracle uses ``torch.func``
(``vmap`` over ``grad`` of a ``functional_call``) and by default runs in float64 on exact upcasts of
the given tensors, so a float32 case is compared with the float64 truth for the same float32 values.

The quantities the layer compiler returns follow from J alone:

    gram  K      = J J^T                      [m, m]
    jvp   J p    = J @ cat(p_k.flatten())     [m]
    vjp   J^T u  = split(J^T u)               tuple shaped like the parameters
    jacobian     = split(J) per sample        tuple of [m, *param.shape]
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .numerics import rel_err

__all__ = [
    "trainable_params",
    "as_oracle_module",
    "per_sample_jacobian",
    "per_sample_jacobian_loop",
    "oracle_gram",
    "oracle_jvp",
    "oracle_vjp",
    "split_rows",
    "FixedAffine",
    "batch_stat_view",
]


def trainable_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs with requires_grad, in module.parameters() order."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _upcast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not t.is_floating_point():
        return t
    return t.to(dtype)


def as_oracle_module(module: nn.Module, dtype: torch.dtype | None = torch.float64) -> nn.Module:
    """A deep copy of ``module`` with floating params/buffers cast to ``dtype`` (None: unchanged).

    requires_grad flags are kept, so frozen parameters stay frozen.
    """
    mod = copy.deepcopy(module)
    if dtype is not None:
        flags = {n: p.requires_grad for n, p in mod.named_parameters()}
        mod = mod.to(dtype)
        for n, p in mod.named_parameters():
            p.requires_grad_(flags[n])
    return mod


def per_sample_jacobian(
    module: nn.Module,
    x: torch.Tensor,
    gy: torch.Tensor,
    dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """J [m, p] via torch.func: vmap over grad of <gy_i, module(x_i[None])[0]>.

    ``x`` is the module input as its forward receives it (raw input for LayerNorm, a LongTensor of
    ids for Embedding); ``gy`` has the shape of ``module(x)``. With ``dtype`` (default float64)
    the module, a floating ``x`` and ``gy`` are upcast first; pass ``dtype=None`` to run in the
    given dtypes.
    """
    mod = as_oracle_module(module, dtype)
    x = _upcast(x.detach(), dtype)
    gy = _upcast(gy.detach(), dtype)
    if x.shape[0] != gy.shape[0]:
        raise ValueError(f"batch mismatch: x {tuple(x.shape)} vs gy {tuple(gy.shape)}")
    names = [n for n, _ in trainable_params(mod)]
    params = {n: p.detach() for n, p in trainable_params(mod)}
    m = x.shape[0]
    if not names:
        return torch.zeros(m, 0, dtype=gy.dtype)

    def inner(prm: dict[str, torch.Tensor], xi: torch.Tensor, gyi: torch.Tensor) -> torch.Tensor:
        yi = functional_call(mod, prm, (xi.unsqueeze(0),))[0]
        return (yi * gyi).sum()

    grads = vmap(grad(inner), in_dims=(None, 0, 0))(params, x, gy)
    return torch.cat([grads[n].reshape(m, -1) for n in names], dim=1)


def per_sample_jacobian_loop(
    module: nn.Module,
    x: torch.Tensor,
    gy: torch.Tensor,
    dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """The same J as :func:`per_sample_jacobian`, by a plain loop of torch.autograd.grad.

    Deliberately naive (no torch.func): used only to check the oracle itself.
    """
    mod = as_oracle_module(module, dtype)
    x = _upcast(x.detach(), dtype)
    gy = _upcast(gy.detach(), dtype)
    params = [p for _, p in trainable_params(mod)]
    if not params:
        return torch.zeros(x.shape[0], 0, dtype=gy.dtype)
    rows = []
    for i in range(x.shape[0]):
        y = mod(x[i : i + 1])
        s = (y[0] * gy[i]).sum()
        gs = torch.autograd.grad(s, params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(gs, params)
                ]
            )
        )
    return torch.stack(rows)


def oracle_gram(J: torch.Tensor) -> torch.Tensor:
    """K = J J^T, [m, m]."""
    return J @ J.T


def _flat(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if len(tensors) == 0:
        return torch.zeros(0, dtype=dtype)
    return torch.cat([t.detach().to(dtype).reshape(-1) for t in tensors])


def oracle_jvp(J: torch.Tensor, p_list: Sequence[torch.Tensor]) -> torch.Tensor:
    """J @ cat(p.flatten() for p in p_list), [m]."""
    p = _flat(p_list, J.dtype)
    if p.numel() != J.shape[1]:
        raise ValueError(f"p has {p.numel()} entries, J has {J.shape[1]} columns")
    return J @ p


def _shapes(params) -> list[torch.Size]:
    out = []
    for item in params:
        pair = isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)
        t = item[1] if pair else item
        out.append(t.shape if isinstance(t, torch.Tensor) else torch.Size(t))
    return out


def split_rows(v: torch.Tensor, params) -> tuple[torch.Tensor, ...]:
    """Split the last axis of ``v`` ([..., p]) into tensors [..., *shape_k].

    ``params`` is a sequence of tensors, of (name, tensor) pairs, or of shapes.
    """
    shapes = _shapes(params)
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if sum(sizes) != v.shape[-1]:
        raise ValueError(f"{v.shape[-1]} columns, parameters hold {sum(sizes)}")
    lead = v.shape[:-1]
    return tuple(c.reshape(*lead, *s) for c, s in zip(torch.split(v, sizes, dim=-1), shapes))


def oracle_vjp(J: torch.Tensor, u: torch.Tensor, params) -> tuple[torch.Tensor, ...]:
    """J^T u split back into the parameter shapes (params: tensors, (name, tensor) pairs or shapes)."""
    return split_rows(J.T @ u.detach().to(J.dtype), params)


# --------------------------------------------------------------------------- plan comparison
# Library-agnostic: these only call the public methods of a compiled plan (docs/api-contract.md),
# so the oracle module itself never imports tengrad.

QUANTITIES = ("gram", "jvp", "vjp", "jacobian")


def _check(label: str, got, want: torch.Tensor, dtype: torch.dtype, tol: float, out: list[str]) -> None:
    if not isinstance(got, torch.Tensor):
        out.append(f"{label}: returned {type(got).__name__}, expected a Tensor")
        return
    if tuple(got.shape) != tuple(want.shape):
        out.append(f"{label}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        return
    if got.dtype != dtype:
        out.append(f"{label}: dtype {got.dtype}, expected {dtype} (gy's dtype)")
    e = rel_err(got, want)
    if not e <= tol:  # also catches NaN
        out.append(f"{label}: rel_err={e:.3e} > tol={tol:.0e}")


def _check_tuple(label: str, got, want: Sequence[torch.Tensor], names: Sequence[str],
                 dtype: torch.dtype, tol: float, out: list[str]) -> None:
    if not isinstance(got, (tuple, list)) or len(got) != len(want):
        n = len(got) if isinstance(got, (tuple, list)) else type(got).__name__
        out.append(f"{label}: returned {n} tensors, expected a tuple of {len(want)}")
        return
    for g, w, n in zip(got, want, names):
        _check(f"{label}[{n}]", g, w, dtype, tol, out)


def compare_plan(plan, module: nn.Module, x: torch.Tensor, gy: torch.Tensor, J: torch.Tensor,
                 p: Sequence[torch.Tensor], u: torch.Tensor, tol: float,
                 quantities: Sequence[str] = QUANTITIES,
                 accept: tuple[type[BaseException], ...] = ()) -> list[str]:
    """Check ``plan`` against the oracle J for every order of every quantity, and order=None.

    Returns a list of human-readable failure strings (empty: all good). Exceptions of a type in
    ``accept`` count as an allowed refusal; any other exception is a failure.
    ``J`` is the float64 oracle Jacobian for exactly these (x, gy) values.
    """
    names = [n for n, _ in trainable_params(module)]
    shapes = [t.shape for _, t in trainable_params(module)]
    dtype = gy.dtype
    u64 = u.to(torch.float64)
    want = {
        "gram": oracle_gram(J),
        "jvp": oracle_jvp(J, p),
        "vjp": oracle_vjp(J, u64, shapes),
        "jacobian": split_rows(J, shapes),
    }
    x0, gy0 = x.clone(), gy.clone()
    out: list[str] = []

    def call(label, fn):
        try:
            return True, fn()
        except accept:
            return False, None
        except Exception as exc:  # noqa: BLE001 - report every failure, keep checking the rest
            out.append(f"{label}: raised {type(exc).__name__}: {exc}")
            return False, None

    for q in quantities:
        if q == "jacobian":
            ok, got = call("jacobian", lambda: plan.jacobian(x, gy))
            if ok:
                _check_tuple("jacobian", got, want[q], names, dtype, tol, out)
            continue
        ok, orders = call(f"orders({q!r})", lambda: list(plan.orders(q)))
        if not ok:
            orders = []
        elif not orders:
            out.append(f"orders({q!r}) is empty")
        for order in [None, *orders]:
            label = f"{q} order={order!r}"
            if q == "gram":
                ok, got = call(label, lambda: plan.gram(x, gy, order=order))
                if ok:
                    _check(label, got, want[q], dtype, tol, out)
            elif q == "jvp":
                ok, got = call(label, lambda: plan.jvp(x, gy, p, order=order))
                if ok:
                    _check(label, got, want[q], dtype, tol, out)
            elif q == "vjp":
                ok, got = call(label, lambda: plan.vjp(x, gy, u, order=order))
                if ok:
                    _check_tuple(label, got, want[q], names, dtype, tol, out)
            else:
                raise ValueError(f"unknown quantity {q!r}")
    if not torch.equal(x, x0) or not torch.equal(gy, gy0):
        out.append("inputs x / gy were modified in place")
    return out


# --------------------------------------------------------------------------- coupled samples
class FixedAffine(nn.Module):
    """``y[n, c, s..] = x_hat[n, c, s..] weight[c] + bias[c]``: a norm's affine with x_hat as its input."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        super().__init__()
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None:
                setattr(self, name, nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
            else:
                setattr(self, name, None)

    def forward(self, x_hat: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x_hat.dim() - 2)
        y = x_hat
        if self.weight is not None:
            y = y * self.weight.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y


def batch_stat_view(module: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """The oracle for a norm whose forward couples the samples through batch statistics (BatchNorm in
    training mode, or without running statistics): the module's affine with x_hat held fixed,
    x_hat = (x - mean) / sqrt(var + eps) over every dim but the channel dim 1 (biased variance),
    written out here in float64. Checks that the module's own forward equals that affine."""
    x64 = x.detach().to(torch.float64)
    dims = [0] + list(range(2, x64.dim()))
    mean = x64.mean(dim=dims, keepdim=True)
    var = ((x64 - mean) ** 2).mean(dim=dims, keepdim=True)
    x_hat = (x64 - mean) / torch.sqrt(var + module.eps)
    view = FixedAffine(module.weight, module.bias).to(torch.float64)
    probe = copy.deepcopy(module).to(torch.float64)
    with torch.no_grad():
        y = probe(x64)
        want = view(x_hat)
    if rel_err(y, want) > 1e-10:
        raise AssertionError(f"batch_stat_view does not reproduce {module}: rel err {rel_err(y, want):.2e}")
    return view, x_hat
