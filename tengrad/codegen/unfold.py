"""The unfolded input as a strided view: no im2col copy is made until a contraction needs one.

For a map ``ih = s*oh + d*kh + c`` whose values span ``[lo, hi]`` the input is first *windowed*
along ``ih`` to exactly ``[lo, hi]`` (zeros outside ``[0, N_ih)``; a negative pad crops), then
``U[..., oh, kh, ...] = Xw[..., s*oh + d*kh + (c - lo), ...]`` is an ``as_strided`` view with
strides ``s * stride(ih)`` for ``oh`` and ``d * stride(ih)`` for ``kh``.
"""
from __future__ import annotations

import torch

from tengrad_ir import LayerSpec


def window(x: torch.Tensor, indices: tuple[str, ...], spec: LayerSpec, sizes: dict[str, int],
           primed: bool = False, maps=None) -> torch.Tensor:
    """``x`` (one dim per index) padded or cropped along every mapped index to its map's extent.

    One allocation and one copy: the part of ``x`` inside every window is copied into zeros.
    ``maps``: the maps to window along (None: the spec's input maps; ``spec.out_maps`` for G).
    """
    shape, dst, src = list(x.shape), [slice(None)] * x.dim(), [slice(None)] * x.dim()
    for mp in (spec.maps if maps is None else maps):
        dim = indices.index(mp.target + ("'" if primed else ""))
        low, high = mp.extent(sizes)
        n = x.shape[dim]
        shape[dim] = high - low + 1
        first, last = max(low, 0), min(high, n - 1)  # the input positions inside the window
        if last < first:
            dst[dim] = src[dim] = slice(0, 0)
        else:
            src[dim] = slice(first, last + 1)
            dst[dim] = slice(first - low, last - low + 1)
    if shape == list(x.shape) and all(s == slice(None) or s == slice(0, x.shape[d]) for d, s in enumerate(src)):
        return x.contiguous()
    out = x.new_zeros(shape)
    out[tuple(dst)] = x[tuple(src)]
    return out


def strided_unfold(xw: torch.Tensor, indices: tuple[str, ...], out_indices: tuple[str, ...],
                   spec: LayerSpec, sizes: dict[str, int], pairs: tuple[tuple[str, str], ...] = (),
                   maps=None) -> torch.Tensor:
    """A view of the windowed ``xw`` with one dim per index of ``out_indices``.

    Unmapped indices keep their stride; each map ``target = sum c_k k + offset`` adds ``c_k *
    stride(target)`` to index ``k`` and ``(offset - lo) * stride(target)`` to the storage offset.
    ``pairs`` lists ``(target, variable_suffix)`` copies of the maps to apply as well (used for the
    primed copy in the raw covariance, where ``R[..., P, P']`` is read at ``map(C,K), map(C',K)``).
    ``maps``: as for ``window`` (``spec.out_maps`` unfolds the output gradient).
    """
    strides = {i: 0 for i in out_indices}
    for d, idx in enumerate(indices):
        if idx in strides:
            strides[idx] += xw.stride(d)
    offset = xw.storage_offset()
    copies = pairs or ((None, ""),)
    for mp in (spec.maps if maps is None else maps):
        low, _ = mp.extent(sizes)
        for target_suffix, var_suffix in copies:
            target = mp.target + (target_suffix or "")
            st = xw.stride(indices.index(target))
            for var, coeff in mp.coeffs.items():
                name = var + var_suffix if spec.roles[var] == "common" else var
                strides[name] += coeff * st
            offset += (mp.offset - low) * st
    shape = []
    for i in out_indices:
        base = i[:-1] if i.endswith("'") else i
        shape.append(sizes[base])
    return xw.as_strided(shape, [strides[i] for i in out_indices], offset)
