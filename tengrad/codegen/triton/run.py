"""``TritonTermRun``: a term bound to tensors, its steps run by generated Triton kernels.

Same constructor and interface as ``tengrad.codegen.torch_backend.TermRun`` (the reference every
kernel is tested against); ``backend.py`` maps each step the backend supports to a launcher::

    J (any kind)                 jacobian_kernel (implicit-unfold GEMM per sample)
    K = J J^T                    gemm_nt_kernel (split-K, upper tiles)
    C1, C2, K = sum C1 * C2      gram_factored_kernel (covariance tiles on chip)
    Jp = J p, JTu = u J          gemm_nt_kernel
    Y = U p, Jp = sum Y G        jvp_forward_kernel
    Gu = u G, JTu = Gu U         jacobian_kernel, WEIGHTED (samples split, atomic adds)

The raw-covariance order (factored_raw) has no kernel: the backend does not declare its steps, so
a plan for triton never chooses it.

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

from ..backend import StepRun
from . import cache
from .render import TermLayout, render

TRACE: list | None = None
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


class TritonTermRun(StepRun):
    """One term bound to tensors, as ``TermRun``: ``x`` one dim per raw input index (ids for one-hot,
    None for ones), ``g`` one dim per output index. ``precision``: tl.dot's input precision for
    float32 (``"ieee"`` exact, ``"tf32"`` faster on tensor cores)."""

    def __init__(self, spec: LayerSpec, sizes: dict[str, int], x: torch.Tensor | None, g: torch.Tensor,
                 precision: str = "ieee"):
        super().__init__(spec, sizes, x, g)
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
    def jacobian_acc(self) -> torch.Tensor:
        """J as [m, P] in the accumulator dtype (P in the parameter's layout)."""
        lay, m = self.layout, self.m
        out = self._zeros(m, self.n_params)
        n_g, n_v, n_i = lay.n("g"), lay.n("v"), lay.n("I")
        grid = lambda meta: (m * n_g, triton.cdiv(n_v, meta["BLOCK_V"]), triton.cdiv(n_i, meta["BLOCK_I"]))  # noqa: E731
        _launch(self.kernels.jacobian_kernel, grid, self._xk, self._gk, out, out, m, 1, self.n_params,
                WEIGHTED=False)
        return out

    def weight_grad_acc(self, u: torch.Tensor) -> torch.Tensor:
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

    def gemm_nt(self, a, b, M, N, K, s_a, s_b, symmetric: bool = False) -> torch.Tensor:
        """C[M, N] = A B^T with A[a, k] at a*s_a[0] + k*s_a[1] and B[b, k] at b*s_b[0] + k*s_b[1]."""
        c = self._zeros(M, N)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _launch(self.kernels.gemm_nt_kernel, grid, a, b, c, M, N, K, s_a[0], s_a[1], s_b[0], s_b[1], N, 1,
                SYMMETRIC=symmetric)
        return c

    def gram_factored(self) -> torch.Tensor:
        m = self.m
        k = self._zeros(m, m)
        _launch(self.kernels.gram_factored_kernel, (m, m, self.layout.n("g")), self._xk, self._gk, k, m)
        return k

    def jvp_forward(self, p: torch.Tensor) -> torch.Tensor:
        lay, m = self.layout, self.m
        out = self._zeros(m)
        grid = lambda meta: (m * lay.n("g"), triton.cdiv(lay.n("C"), meta["BLOCK_C"]))  # noqa: E731
        _launch(self.kernels.jvp_forward_kernel, grid, self._xk, self._gk, p, out, m)
        return out

    # ------------------------------------------------------------------ the step interface
    def handler(self, step):
        from .backend import handler_for
        return handler_for(self.spec, step)

    def finish(self, order, out: torch.Tensor) -> torch.Tensor:
        """The last step's result (accumulator dtype, flat) in G's dtype and the result's layout."""
        n = self.spec.batch
        shape = [self.m if i.rstrip("'") == n else self.sizes[i] for i in order.steps[-1].out.indices]
        return out.to(self.dtype).reshape(shape)
