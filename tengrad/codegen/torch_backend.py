"""The torch backend: the reference execution of every order of every term, on any device.

A ``TermRun`` holds one term bound to tensors: ``x`` with one dimension per raw input index (after
the pre-map; integer ids for a one-hot term, None for a ones term) and ``g`` with one dimension per
output index. Each method evaluates one order of ``derive``'s einsums (see ``tengrad_ir.orders``):

    jacobian()           J[n, param...]                   [m, *param]
    gram(order)          K[n, n'] = J J^T                 [m, m]
    jvp(p, order)        (J p)[n]                          [m]
    vjp(u, order)        (J^T u)[param...]                 param shape
"""
from __future__ import annotations

import itertools
import math

import torch

from tengrad_ir import LayerSpec, conv_geometry

from .conv_kernels import ConvLayout
from .einsum import contract
from .unfold import strided_unfold, window


def symmetric_gram(j: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``j @ j.T`` for j: [m, p], computing only the blocks on and above the diagonal.

    With b = ceil(m / block) row blocks this costs (b + 1) / (2 b) of the full product (5/8 at
    b = 4); the blocks below the diagonal are copied transposes.
    """
    m = j.shape[0]
    if m < 2 * block:
        return j @ j.T
    out = j.new_empty(m, m)
    edges = list(range(0, m, block)) + [m]
    for a0, a1 in zip(edges, edges[1:]):
        rows = j[a0:a1]
        blk = rows @ j[a0:].T
        out[a0:a1, a0:] = blk
        out[a1:, a0:a1] = blk[:, a1 - a0:].T
    return out


def _prime(indices, which):
    return tuple(i + "'" if i in which else i for i in indices)


class TermRun:
    def __init__(self, spec: LayerSpec, sizes: dict[str, int], x: torch.Tensor | None, g: torch.Tensor):
        self.spec, self.sizes, self.g = spec, sizes, g
        self.m = g.shape[0]
        self.n = spec.batch
        self.g_idx = spec.output_indices
        self.p_idx = spec.param_indices
        self.x = x
        geo = conv_geometry(spec)
        self.x_idx = tuple(i for i in spec.raw_input_indices if not (spec.source == "one_hot" and i == spec.one_hot))
        self._xw = None
        self.conv = ConvLayout(spec, geo, sizes) if geo is not None else None

    # ------------------------------------------------------------------ operands
    @property
    def xw(self) -> torch.Tensor:
        if self._xw is None:
            self._xw = window(self.x, self.x_idx, self.spec, self.sizes)
        return self._xw

    def unfolded(self) -> torch.Tensor:
        """U as a strided view with one dim per ``spec.unfolded_indices``."""
        return strided_unfold(self.xw, self.x_idx, self.spec.unfolded_indices, self.spec, self.sizes)

    def one_hot_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids flattened over the non-batch input indices [m, T], mask of valid ids [m, T])."""
        ids = self.x.reshape(self.m, -1)
        return ids, ids >= 0

    def _g_rows(self, g: torch.Tensor | None = None):
        """One-hot terms: G as [m, T, rest] with T the input's non-batch indices (common)."""
        rest = tuple(i for i in self.g_idx if i not in self.x_idx)
        t = contract(self.x_idx + rest, (self.g if g is None else g, self.g_idx))
        return t.reshape(self.m, -1, math.prod(self.sizes[i] for i in rest)), rest

    def _param_from_rows(self, rows: torch.Tensor, rest: tuple[str, ...], batch: bool) -> torch.Tensor:
        """Rows indexed (n?, v_onehot, rest) back to (n?, param order)."""
        lead = (self.n,) if batch else ()
        have = lead + (self.spec.one_hot,) + rest
        t = rows.reshape([self.sizes[i] for i in have])
        return contract(lead + self.p_idx, (t, have))

    # ------------------------------------------------------------------ Jacobian
    def jacobian(self) -> torch.Tensor:
        """J[n, param...] (Lemma 1)."""
        s = self.spec
        out = (self.n,) + self.p_idx
        if s.source == "ones":
            return contract(out, (self.g, self.g_idx)).reshape([self.sizes[i] for i in out])
        if s.source == "one_hot":
            ids, valid = self.one_hot_rows()
            rows, rest = self._g_rows()
            vocab = self.sizes[s.one_hot]
            flat = (torch.arange(self.m, device=ids.device)[:, None] * vocab + ids.clamp_min(0))[valid]
            j = rows.new_zeros(self.m * vocab, rows.shape[-1]).index_add_(0, flat, rows[valid])
            return self._param_from_rows(j, rest, batch=True)
        if self.conv is not None:
            c = self.conv
            jc = c.per_sample_weight_grad(c.x(self.xw, self.x_idx), c.y(self.g, self.g_idx))
            return c.w_back(jc, batch=True)
        return contract(out, (self.g, self.g_idx), (self.unfolded(), s.unfolded_indices))

    # ------------------------------------------------------------------ Gram
    def gram(self, order: str) -> torch.Tensor:
        if order == "direct":
            return symmetric_gram(self.jacobian().reshape(self.m, -1))
        if order == "factored":
            return self._gram_factored()
        if order == "factored_raw":
            return self._gram_factored_raw()
        raise KeyError(order)

    def _cov_grad(self, batch_last: bool = False):
        """C2[n, n', g, C, C'] = sum_v G[n,g,v,C] G[n',g,v,C'] and its index tuple
        (``batch_last``: laid out as [g, C, C', n, n'])."""
        s = self.spec
        second = {self.n, *s.indices("common")}
        pair = (self.n, self.n + "'")
        rest = s.indices("group") + s.indices("common") + _prime(s.indices("common"), second)
        idx = rest + pair if batch_last else pair + rest
        c2 = contract(idx, (self.g, self.g_idx), (self.g, _prime(self.g_idx, second)))
        return c2, idx

    def _gram_factored(self) -> torch.Tensor:
        """Theorem 2: K = sum_{g,C,C'} (U U'^T) * (G G'^T)."""
        s = self.spec
        c2, idx = self._cov_grad()
        k_idx = (self.n, self.n + "'")
        if s.source == "ones":
            return contract(k_idx, (c2, idx))
        second = {self.n, *s.indices("common")}
        if s.source == "one_hot":
            # C1[n, n', t, t'] = [ids[n,t] == ids[n',t']], zero where an id is masked out.
            ids, valid = self.one_hot_rows()
            t_idx = self.x_idx[1:]
            eq = (ids[:, None, :, None] == ids[None, :, None, :]) & valid[:, None, :, None] & valid[None, :, None, :]
            eq = eq.to(self.g.dtype).reshape([self.m, self.m] + [self.sizes[i] for i in t_idx] * 2)
            return contract(k_idx, (eq, k_idx + t_idx + _prime(t_idx, second)), (c2, idx))
        u = self.unfolded()
        u_idx = s.unfolded_indices
        c1 = contract(idx, (u, u_idx), (u, _prime(u_idx, second)))
        return contract(k_idx, (c1, idx), (c2, idx))

    def _gram_factored_raw(self) -> torch.Tensor:
        """K from the raw-input covariance R, read through the maps: C1 = sum_K R[map(C,K), map(C',K)].

        R, C1 and C2 are laid out with the sample pair (n, n') last, so that each kernel position's
        strided view of R is a run of contiguous m x m blocks and the sum over K streams memory.
        """
        s = self.spec
        second = {self.n, *s.indices("common"), *(mp.target for mp in s.maps)}
        x_idx = self.x_idx
        pair = (self.n, self.n + "'")
        kept = tuple(i for i in x_idx[1:] if s.roles.get(i) != "independent")
        r_idx = kept + _prime(tuple(i for i in kept if i in second), second) + pair
        r = contract(r_idx, (self.x, x_idx), (self.x, _prime(x_idx, second)))
        rw = window(window(r, r_idx, s, self.sizes), r_idx, s, self.sizes, primed=True)
        kernels = tuple(dict.fromkeys(v for mp in s.maps for v in mp.variables if s.roles[v] == "independent"))
        c2, idx = self._cov_grad(batch_last=True)
        view = strided_unfold(rw, r_idx, idx + kernels, s, self.sizes, pairs=(("", ""), ("'", "'")))
        c1 = torch.zeros(view.shape[:len(idx)], dtype=view.dtype, device=view.device)
        for k in itertools.product(*(range(self.sizes[i]) for i in kernels)):
            c1 += view[(Ellipsis,) + k]
        return (c1 * c2).reshape(-1, self.m, self.m).sum(0)

    # ------------------------------------------------------------------ J p and J^T u
    def jvp(self, p: torch.Tensor, order: str) -> torch.Tensor:
        """(J p)[n] with p shaped like the parameter."""
        s = self.spec
        p = p.reshape([self.sizes[i] for i in self.p_idx])
        if order == "direct":
            return self.jacobian().reshape(self.m, -1) @ p.reshape(-1)
        if order != "forward":
            raise KeyError(order)
        if s.source == "ones":
            return contract((self.n,), (self.g, self.g_idx), (p, self.p_idx))
        if s.source == "one_hot":
            ids, valid = self.one_hot_rows()
            rows, rest = self._g_rows()
            table = contract((s.one_hot,) + rest, (p, self.p_idx)).reshape(self.sizes[s.one_hot], -1)
            y = table[ids.clamp_min(0)] * valid[..., None]
            return (y * rows).sum(dim=(1, 2))
        if self.conv is not None:
            c = self.conv
            y = c.forward(c.x(self.xw, self.x_idx), c.w(p))
            return (y.reshape(self.m, -1) * c.y(self.g, self.g_idx).reshape(self.m, -1)).sum(1)
        y_idx = self.g_idx
        y = contract(y_idx, (self.unfolded(), s.unfolded_indices), (p, self.p_idx))
        return contract((self.n,), (y, y_idx), (self.g, self.g_idx))

    def vjp(self, u: torch.Tensor, order: str) -> torch.Tensor:
        """(J^T u)[param...] with u: [m]."""
        s = self.spec
        shape = [self.sizes[i] for i in self.p_idx]
        if order == "direct":
            return (u @ self.jacobian().reshape(self.m, -1)).reshape(shape)
        if order != "weight_grad":
            raise KeyError(order)
        gu = self.g * u.reshape((self.m,) + (1,) * (self.g.dim() - 1))
        if s.source == "ones":
            return contract(self.p_idx, (gu, self.g_idx)).reshape(shape)
        if s.source == "one_hot":
            ids, valid = self.one_hot_rows()
            rows, rest = self._g_rows(gu)
            dw = rows.new_zeros(self.sizes[s.one_hot], rows.shape[-1])
            dw.index_add_(0, ids[valid], rows[valid])
            return self._param_from_rows(dw, rest, batch=False)
        if self.conv is not None:
            c = self.conv
            return c.w_back(c.weight_grad(c.x(self.xw, self.x_idx), c.y(gu, self.g_idx)))
        return contract(self.p_idx, (gu, self.g_idx), (self.unfolded(), s.unfolded_indices))
