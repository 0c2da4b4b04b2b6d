"""Terms whose output maps are transposed convolutions run on torch's own kernels.

Layout (``TransposedGeometry`` gives the spatial triples ``out = s*inp + d*kernel + c``)::

    X  [n, (g Ir), I...]     input, Ir the independent indices (input channels per group)
    W  [(g Ir), v, K...]     parameter (torch's ConvTranspose weight layout), v the free non-kernel indices
    G  [n, (g v), O...]      output gradient; Gw: G windowed along O to the maps' extent [c, c + L - 1]

forward   Y = conv_transpose(X, W, stride=s, dilation=d, groups=N_g) over the full extent
          L = s (N_i - 1) + d (N_k - 1) + 1, then placed at offset c into [0, N_o) (J p, "forward")
weight    dW[(g Ir), v, k] = sum_{n,i} X[n, (g Ir), i] Gw[n, (g v), s i + d k]: the weight gradient of
          a *convolution* whose input is Gw and whose output gradient is X (J^T u, "weight_grad")
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn import grad as nn_grad

from tengrad_ir import LayerSpec
from tengrad_ir.geometry import TransposedGeometry

from .unfold import window

_FORWARD = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_WEIGHT = {1: nn_grad.conv1d_weight, 2: nn_grad.conv2d_weight, 3: nn_grad.conv3d_weight}


class ConvTransposeLayout:
    """Permutations between a transposed-conv spec's index order and torch's layout."""

    def __init__(self, spec: LayerSpec, geo: TransposedGeometry, sizes: dict[str, int]):
        self.spec, self.geo, self.sizes = spec, geo, sizes
        self.g = spec.indices("group")
        self.v = tuple(i for i in spec.indices("free") if i not in geo.kernels)
        self.ir = spec.indices("independent")
        self.dims = len(geo.targets)
        self.x_order = (spec.batch,) + self.g + self.ir + geo.ins
        self.w_order = self.g + self.ir + self.v + geo.kernels
        self.y_order = (spec.batch,) + self.g + self.v + geo.targets
        size = lambda idx: math.prod(sizes[i] for i in idx)  # noqa: E731
        self.n_g, self.n_v, self.n_ir = size(self.g), size(self.v), size(self.ir)
        self.kernel = tuple(sizes[k] for k in geo.kernels)

    @staticmethod
    def permute(t: torch.Tensor, have: tuple[str, ...], want: tuple[str, ...]) -> torch.Tensor:
        return t.permute([have.index(i) for i in want])

    def x(self, x: torch.Tensor, x_idx: tuple[str, ...]) -> torch.Tensor:
        t = self.permute(x, x_idx, self.x_order)
        return t.reshape(t.shape[0], self.n_g * self.n_ir, *t.shape[-self.dims:])

    def gw(self, g: torch.Tensor, g_idx: tuple[str, ...]) -> torch.Tensor:
        """G windowed along the output maps to their extent, in conv layout [n, (g v), L...]."""
        t = self.permute(window(g, g_idx, self.spec, self.sizes, maps=self.spec.out_maps), g_idx, self.y_order)
        return t.reshape(t.shape[0], self.n_g * self.n_v, *t.shape[-self.dims:])

    def w(self, p: torch.Tensor) -> torch.Tensor:
        t = self.permute(p, self.spec.param_indices, self.w_order)
        return t.reshape(self.n_g * self.n_ir, self.n_v, *self.kernel)

    def w_back(self, w: torch.Tensor) -> torch.Tensor:
        t = w.reshape([self.sizes[i] for i in self.w_order])
        return self.permute(t, self.w_order, self.spec.param_indices)

    def forward(self, xc: torch.Tensor, wc: torch.Tensor, out_indices: tuple[str, ...]) -> torch.Tensor:
        """Y with one dim per ``out_indices`` (the spec's output indices, in any order)."""
        full = _FORWARD[self.dims](xc, wc, stride=self.geo.stride, dilation=self.geo.dilation, groups=self.n_g)
        out_sizes = [self.sizes[t] for t in self.geo.targets]
        y = full.new_zeros(*full.shape[:2], *out_sizes)
        dst, src = [slice(None)] * 2, [slice(None)] * 2
        for low, length, n in zip(self.geo.offset, full.shape[2:], out_sizes):
            first, last = max(low, 0), min(low + length - 1, n - 1)
            if last < first:
                return self.permute(y.reshape([self.sizes[i] for i in self.y_order]), self.y_order, out_indices)
            dst.append(slice(first, last + 1))
            src.append(slice(first - low, last - low + 1))
        y[tuple(dst)] = full[tuple(src)]
        return self.permute(y.reshape([self.sizes[i] for i in self.y_order]), self.y_order, out_indices)

    def weight_grad(self, xc: torch.Tensor, gw: torch.Tensor) -> torch.Tensor:
        shape = (self.n_g * self.n_ir, self.n_v, *self.kernel)
        return _WEIGHT[self.dims](gw, shape, xc, stride=self.geo.stride, dilation=self.geo.dilation,
                                  groups=self.n_g)
