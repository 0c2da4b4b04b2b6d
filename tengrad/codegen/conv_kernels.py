"""Terms whose maps are convolutions run on torch's own convolution kernels.

Layout (``ConvGeometry`` gives the spatial triples ``target = s*out + d*kernel + c``)::

    X  [n, (g Ir), P...]    windowed input, Ir the independent indices of the raw input
    W  [(g v), Ir, K...]    parameter
    G  [n, (g v), O...]     output gradient

forward    Y = conv(X, W, stride=s, dilation=d, groups=N_g)                  (J p, "forward")
weight     dW = conv_weight(X, G u, ...)                                     (J^T u, "weight_grad")
per-sample J: the batch folded into the groups, conv_weight on [1, (n g Ir), P] with groups m N_g
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn import grad as nn_grad

from tengrad_ir import ConvGeometry, LayerSpec

_FORWARD = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_WEIGHT = {1: nn_grad.conv1d_weight, 2: nn_grad.conv2d_weight, 3: nn_grad.conv3d_weight}


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

    def per_sample_weight_grad(self, xc: torch.Tensor, gc: torch.Tensor) -> torch.Tensor:
        """J: one weight gradient per sample, the batch folded into the convolution groups."""
        m = xc.shape[0]
        shape = (m * self.n_g * self.n_v, self.n_ir, *[self.sizes[k] for k in self.geo.kernels])
        x1 = xc.reshape(1, m * xc.shape[1], *xc.shape[2:])
        g1 = gc.reshape(1, m * gc.shape[1], *gc.shape[2:])
        return _WEIGHT[self.dims](x1, shape, g1, stride=self.geo.stride, dilation=self.geo.dilation,
                                  groups=m * self.n_g)
