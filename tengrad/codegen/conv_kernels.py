"""Terms whose maps are convolutions run on torch's own convolution kernels.

Layout (``ConvGeometry`` gives the spatial triples ``target = s*out + d*kernel + c``)::

    X  [n, (g Ir), P...]    windowed input, Ir the independent indices of the raw input
    W  [(g v), Ir, K...]    parameter
    G  [n, (g v), O...]     output gradient

forward    Y = conv(X, W, stride=s, dilation=d, groups=N_g)                  (J p, "forward")
weight     dW = conv_weight(X, G u, ...)                                     (J^T u, "weight_grad")
per-sample J: im2col of X in chunks of samples and one batched matmul per chunk (``im2col_bmm``):
           U[(n g), (Ir K), O] = X[n, (g Ir), s*O + d*K]   (an as_strided view, copied per chunk)
           J[(n g), v, (Ir K)] = sum_O G[(n g), v, O] U[(n g), (Ir K), O]            (torch.bmm)
           or torch's grouped weight gradient with the batch folded into the groups (``grouped``)
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn import grad as nn_grad

from tengrad_ir import ConvGeometry, LayerSpec

_FORWARD = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_WEIGHT = {1: nn_grad.conv1d_weight, 2: nn_grad.conv2d_weight, 3: nn_grad.conv3d_weight}
IM2COL_CHUNK_BYTES = 2 * 2 ** 20   # unfolded input per bmm chunk: stays in cache, reused by the allocator
IM2COL, GROUPED = "im2col_bmm", "grouped"
KERNEL_TEXT = {IM2COL: "im2col (as_strided view, copied 2 MiB of samples at a time) + torch.bmm with G",
               GROUPED: "torch.nn.grad.conv1d/2d/3d_weight, the batch folded into the groups"}


IM2COL_MANY_THREADS_MAX = 2 ** 21   # unfolded elements of the whole batch im2col may take with > 1 thread


def per_sample_kernel(n_g: int, unfolded: int = 0, threads: int = 1) -> str:
    """The per-sample J kernel for N_g convolution groups, ``unfolded`` = m N_g N_I N_C elements of
    unfolded input for the whole batch and ``threads`` intra-op threads: im2col + bmm for an ungrouped
    conv with 1 thread, or with more threads when the batch's unfolded input is at most
    IM2COL_MANY_THREADS_MAX elements (4 chunks); torch's grouped weight gradient otherwise.

    Why: with one thread im2col + bmm is the faster kernel for ungrouped convolutions, while grouped
    convolutions lose with bmm (one small matmul per sample and group). With several threads every
    chunk is two parallel regions, and a region waits for any descheduled thread, so a batch of many
    chunks can lose badly on a busy machine while a batch of a few chunks still wins. The timings
    behind the rule and its threshold are in docs/experiments/step-cost.md.
    """
    if n_g != 1:
        return GROUPED
    return IM2COL if threads <= 1 or unfolded <= IM2COL_MANY_THREADS_MAX else GROUPED


class ConvLayout:
    """Permutations between a conv-like spec's index order and torch's convolution layout."""

    def __init__(self, spec: LayerSpec, geo: ConvGeometry, sizes: dict[str, int]):
        self.spec, self.geo, self.sizes = spec, geo, sizes
        self.g = spec.indices("group")
        self.v = spec.indices("free")
        self.ir = tuple(i for i in spec.indices("independent") if i not in geo.kernels)
        self.dims = len(geo.targets)
        self.x_order = (spec.batch,) + self.g + self.ir + geo.targets
        self.w_order = self.g + self.v + self.ir + geo.kernels
        self.y_order = (spec.batch,) + self.g + self.v + geo.outs
        size = lambda idx: math.prod(sizes[i] for i in idx)  # noqa: E731
        self.n_g, self.n_v, self.n_ir = size(self.g), size(self.v), size(self.ir)

    @staticmethod
    def permute(t: torch.Tensor, have: tuple[str, ...], want: tuple[str, ...]) -> torch.Tensor:
        return t.permute([have.index(i) for i in want])

    def x(self, xw: torch.Tensor, x_idx: tuple[str, ...]) -> torch.Tensor:
        t = self.permute(xw, x_idx, self.x_order)
        return t.reshape(t.shape[0], self.n_g * self.n_ir, *t.shape[-self.dims:])

    def y(self, g: torch.Tensor, g_idx: tuple[str, ...]) -> torch.Tensor:
        t = self.permute(g, g_idx, self.y_order)
        return t.reshape(t.shape[0], self.n_g * self.n_v, *t.shape[-self.dims:])

    def w(self, p: torch.Tensor) -> torch.Tensor:
        t = self.permute(p, self.spec.param_indices, self.w_order)
        return t.reshape(self.n_g * self.n_v, self.n_ir, *t.shape[-self.dims:])

    def w_back(self, w: torch.Tensor, batch: bool = False) -> torch.Tensor:
        """Conv-layout weight(s) back to the spec's parameter index order (with a leading n)."""
        lead = (self.spec.batch,) if batch else ()
        order = lead + self.w_order
        t = w.reshape([self.sizes[i] for i in order])
        return self.permute(t, order, lead + self.spec.param_indices)

    def forward(self, xc: torch.Tensor, wc: torch.Tensor) -> torch.Tensor:
        return _FORWARD[self.dims](xc, wc, stride=self.geo.stride, dilation=self.geo.dilation, groups=self.n_g)

    def weight_grad(self, xc: torch.Tensor, gc: torch.Tensor) -> torch.Tensor:
        shape = (self.n_g * self.n_v, self.n_ir, *[self.sizes[k] for k in self.geo.kernels])
        return _WEIGHT[self.dims](xc, shape, gc, stride=self.geo.stride, dilation=self.geo.dilation,
                                  groups=self.n_g)

    @property
    def kernel(self) -> str:
        """The per-sample J kernel at these sizes and torch's thread count (``per_sample_kernel``)."""
        return per_sample_kernel(self.n_g, self.unfolded_elements(), torch.get_num_threads())

    def unfolded_elements(self) -> int:
        """m N_g N_I N_C: the unfolded input of the whole batch."""
        nk = math.prod(self.sizes[k] for k in self.geo.kernels)
        no = math.prod(self.sizes[o] for o in self.geo.outs)
        return self.sizes[self.spec.batch] * self.n_g * self.n_ir * nk * no

    def per_sample_weight_grad(self, xc: torch.Tensor, gc: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
        """J [(m N_g N_v), N_Ir, K...]: one weight gradient per sample (``kernel`` None: ``self.kernel``)."""
        if (kernel or self.kernel) == IM2COL:
            return self.per_sample_im2col_bmm(lambda a, b: xc[a:b], gc)
        return self.per_sample_grouped(xc, gc)

    def per_sample_im2col_bmm(self, x_chunk: Callable[[int, int], torch.Tensor], gc: torch.Tensor) -> torch.Tensor:
        """J by im2col + bmm, ``IM2COL_CHUNK_BYTES`` of unfolded input at a time.

        ``x_chunk(a, b)``: samples a..b-1 of the windowed input in conv layout [b - a, (g Ir), P...], so
        that ``P = s*O + d*K`` (the caller may window each chunk: no full padded copy); gc [m, (g v), O...].
        Per chunk the unfolded input is the only copy; G is read in place and J written in place.
        """
        m, ng, nv, nir = gc.shape[0], self.n_g, self.n_v, self.n_ir
        ks = [self.sizes[k] for k in self.geo.kernels]
        outs = list(gc.shape[2:])
        nk, no = math.prod(ks), math.prod(outs)
        g3 = gc.reshape(m, ng, nv, no)
        out = gc.new_empty(m, ng, nv, nir * nk)
        per_sample = ng * nir * nk * no * gc.element_size()
        chunk = max(1, min(m, IM2COL_CHUNK_BYTES // max(per_sample, 1)))
        for a in range(0, m, chunk):
            b = min(m, a + chunk)
            xc = x_chunk(a, b)
            st = xc.stride()
            sp = st[2:]
            u = xc.as_strided((b - a, ng, nir, *ks, *outs),
                              (st[0], nir * st[1], st[1], *[d * s for d, s in zip(self.geo.dilation, sp)],
                               *[s_ * s for s_, s in zip(self.geo.stride, sp)]), xc.storage_offset())
            rows = (b - a) * ng
            cols = u.reshape(rows, nir * nk, no)                          # the im2col copy of this chunk
            torch.bmm(g3[a:b].reshape(rows, nv, no), cols.transpose(1, 2),
                      out=out[a:b].view(rows, nv, nir * nk))
        return out.view(m * ng * nv, nir, *ks)

    def per_sample_grouped(self, xc: torch.Tensor, gc: torch.Tensor) -> torch.Tensor:
        """J: torch's weight gradient with the batch folded into the convolution groups."""
        m = xc.shape[0]
        shape = (m * self.n_g * self.n_v, self.n_ir, *[self.sizes[k] for k in self.geo.kernels])
        x1 = xc.reshape(1, m * xc.shape[1], *xc.shape[2:])
        g1 = gc.reshape(1, m * gc.shape[1], *gc.shape[2:])
        return _WEIGHT[self.dims](x1, shape, g1, stride=self.geo.stride, dilation=self.geo.dilation,
                                  groups=m * self.n_g)
