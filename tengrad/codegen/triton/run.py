"""``TritonTermRun``: the torch backend's ``TermRun`` interface, executed by generated Triton kernels.

Same constructor and methods as ``tengrad.codegen.torch_backend.TermRun`` (the reference every
kernel is tested against)::

    jacobian()        J[n, param...]        jacobian_kernel (implicit-unfold GEMM per sample)
    gram("direct")    K = J J^T             jacobian_kernel, then gemm_nt_kernel (split-K, upper tiles)
    gram("factored")  K = sum C1 * C2       gram_factored_kernel (covariance tiles on chip)
    gram("factored_raw")                    delegates to the factored kernel (same K; the raw-input
                                            covariance order has no kernel of its own yet)
    jvp(p, "direct")  J p from J            jacobian_kernel, then gemm_nt_kernel
    jvp(p, "forward") sum G * (U p)         jvp_forward_kernel
    vjp(u, "direct")  u^T J                 jacobian_kernel, then gemm_nt_kernel
    vjp(u, "weight_grad") sum u G U         jacobian_kernel, WEIGHTED (samples split, atomic adds)

Each launcher is thin (check, allocate, grid, launch). Inputs are made contiguous (a copy only if
they were not: never larger than x or G); the only other allocations are the outputs (K, J p,
J^T u) and, for the direct orders, J itself. Accumulation is float32 (float64 for float64 input);
the result is returned in G's dtype. ``TRACE``: set to a list to record every launch's tensor
arguments (name, [(shape, numel), ...]) -- the allocation test uses it.
"""
from __future__ import annotations

import functools
import os

import torch
import triton

from tengrad_ir import LayerSpec

from . import cache
from .render import TermLayout, render

TRACE: list | None = None
ORDERS = {"gram": ("direct", "factored", "factored_raw"), "jvp": ("direct", "forward"),
          "vjp": ("direct", "weight_grad")}
TARGET_PROGRAMS = 512  # the weight gradient splits its samples until about this many programs run


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=256)
def _source(spec: LayerSpec, sizes: tuple, acc: str, precision: str | None, interpret: bool) -> str:
    return render(spec, dict(sizes), acc=acc, precision=precision, interpret=interpret)


def _launch(kernel, grid, *args, **meta):
    if TRACE is not None:
        TRACE.append((kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel),
                      [(tuple(a.shape), a.numel()) for a in args if isinstance(a, torch.Tensor)]))
    kernel[grid](*args, **meta)


class TritonTermRun:
    """One term bound to tensors, as ``TermRun``: ``x`` one dim per raw input index (ids for one-hot,
    None for ones), ``g`` one dim per output index. ``precision``: tl.dot's input precision for
    float32 (``"ieee"`` exact, ``"tf32"`` faster on tensor cores)."""

    def __init__(self, spec: LayerSpec, sizes: dict[str, int], x: torch.Tensor | None, g: torch.Tensor,
                 precision: str = "ieee"):
        self.spec, self.sizes, self.x, self.g = spec, sizes, x, g
        self.m = g.shape[0]
        self.layout = TermLayout(spec, tuple(sorted((k, v) for k, v in sizes.items() if k != spec.batch)))
        self.dtype = g.dtype
        self.acc_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
        acc = "tl.float64" if self.acc_dtype == torch.float64 else "tl.float32"
        self._key = (spec, self.layout.sizes, acc, precision if acc == "tl.float32" else None, interpreting())
        self._gk = g.contiguous()
        self._xk = self._gk if x is None else x.contiguous()  # ones: a placeholder pointer, never read
        self.param_shape = [sizes[i] for i in spec.param_indices]
        self.n_params = self.layout.n_params

    # ------------------------------------------------------------------ the generated module
    def source(self) -> str:
        """The generated Triton module (docstring, helpers with the address arithmetic, kernels)."""
        return _source(*self._key)

    @property
    def kernels(self):
        return cache.load(self.source())

    def _zeros(self, *shape):
        return torch.zeros(shape, dtype=self.acc_dtype, device=self.g.device)

    # ------------------------------------------------------------------ launchers
    def _jacobian_acc(self) -> torch.Tensor:
        """J as [m, P] in the accumulator dtype (P in the parameter's layout)."""
        lay, m = self.layout, self.m
        out = self._zeros(m, self.n_params)
        n_g, n_v, n_i = lay.n("g"), lay.n("v"), lay.n("I")
        grid = lambda meta: (m * n_g, triton.cdiv(n_v, meta["BLOCK_V"]), triton.cdiv(n_i, meta["BLOCK_I"]))  # noqa: E731
        _launch(self.kernels.jacobian_kernel, grid, self._xk, self._gk, out, out, m, 1, self.n_params,
                WEIGHTED=False)
        return out

    def _weight_grad_acc(self, u: torch.Tensor) -> torch.Tensor:
        lay, m = self.layout, self.m
        n_g, n_v, n_i = lay.n("g"), lay.n("v"), lay.n("I")
        tiles = n_g * triton.cdiv(n_v, 64) * triton.cdiv(n_i, 64)
        chunks = max(1, min(m, TARGET_PROGRAMS // max(tiles, 1)))
        per = triton.cdiv(m, chunks)
        chunks = triton.cdiv(m, per)
        out = self._zeros(self.n_params)
        grid = lambda meta: (chunks * n_g, triton.cdiv(n_v, meta["BLOCK_V"]), triton.cdiv(n_i, meta["BLOCK_I"]))  # noqa: E731
        _launch(self.kernels.jacobian_kernel, grid, self._xk, self._gk, u.contiguous(), out, m, per, 0,
                WEIGHTED=True)
        return out

    def _gemm_nt(self, a, b, M, N, K, s_a, s_b, symmetric: bool = False) -> torch.Tensor:
        """C[M, N] = A B^T with A[a, k] at a*s_a[0] + k*s_a[1] and B[b, k] at b*s_b[0] + k*s_b[1]."""
        c = self._zeros(M, N)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _launch(self.kernels.gemm_nt_kernel, grid, a, b, c, M, N, K, s_a[0], s_a[1], s_b[0], s_b[1], N, 1,
                SYMMETRIC=symmetric)
        return c

    def _gram_factored(self) -> torch.Tensor:
        m = self.m
        k = self._zeros(m, m)
        _launch(self.kernels.gram_factored_kernel, (m, m, self.layout.n("g")), self._xk, self._gk, k, m)
        return k

    def _jvp_forward(self, p: torch.Tensor) -> torch.Tensor:
        lay, m = self.layout, self.m
        out = self._zeros(m)
        grid = lambda meta: (m * lay.n("g"), triton.cdiv(lay.n("C"), meta["BLOCK_C"]))  # noqa: E731
        _launch(self.kernels.jvp_forward_kernel, grid, self._xk, self._gk, p, out, m)
        return out

    # ------------------------------------------------------------------ TermRun's interface
    def jacobian(self) -> torch.Tensor:
        """J[n, param...] (Lemma 1), [m, *param]."""
        return self._jacobian_acc().to(self.dtype).reshape([self.m] + self.param_shape)

    def gram(self, order: str) -> torch.Tensor:
        """K = J J^T, [m, m]."""
        if order == "direct":
            j = self._jacobian_acc()
            return self._gemm_nt(j, j, self.m, self.m, self.n_params, (self.n_params, 1),
                                 (self.n_params, 1), symmetric=True).to(self.dtype)
        if order in ("factored", "factored_raw"):
            return self._gram_factored().to(self.dtype)
        raise KeyError(f"{self.spec.name}: unknown gram order {order!r}; valid: {ORDERS['gram']}")

    def jvp(self, p: torch.Tensor, order: str) -> torch.Tensor:
        """(J p)[n], [m]; p shaped like the parameter."""
        p = p.reshape(-1).contiguous()
        if order == "direct":
            j = self._jacobian_acc()
            return self._gemm_nt(j, p, self.m, 1, self.n_params, (self.n_params, 1), (0, 1))[:, 0].to(self.dtype)
        if order == "forward":
            return self._jvp_forward(p).to(self.dtype)
        raise KeyError(f"{self.spec.name}: unknown jvp order {order!r}; valid: {ORDERS['jvp']}")

    def vjp(self, u: torch.Tensor, order: str) -> torch.Tensor:
        """(J^T u)[param...], shaped like the parameter; u: [m]."""
        if order == "direct":
            j = self._jacobian_acc()
            out = self._gemm_nt(u.contiguous(), j, 1, self.n_params, self.m, (0, 1), (1, self.n_params))[0]
        elif order == "weight_grad":
            out = self._weight_grad_acc(u)
        else:
            raise KeyError(f"{self.spec.name}: unknown vjp order {order!r}; valid: {ORDERS['vjp']}")
        return out.to(self.dtype).reshape(self.param_shape)
