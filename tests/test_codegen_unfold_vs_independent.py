"""The index-map unfolding checked against two independent constructions (STYLE.md, habit 7).

``strided_unfold(window(x))`` builds U as an ``as_strided`` view from the spec's maps. Here it is
compared, on a battery of convolution configurations (1-3 spatial dims, stride, dilation, padding
int / tuple / 'same' / 'valid', groups, depthwise), with

* ``F.unfold`` (torch's im2col, 2-D only): U rearranged to [n, (g ci kh kw), (oh ow)];
* a dense index pattern built from the maps, as einconv does: for each map ``i = s*o + d*k + c``
  a 0/1 tensor P[o, k, i] = [i == s*o + d*k + c and 0 <= i < N_i], and U = X contracted with the
  patterns (plain einsum, no strides, zero padding falls out of the range check).

Non-convolution maps (a map of one common index only, a map with a unit-coefficient offset that
crops) are checked against the dense pattern as well, and so is the output gradient unfolded through
a transposed convolution's output maps (GU).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tengrad
from tengrad.compiler.binding import bind_sizes, to_indexed
from tengrad.codegen.unfold import strided_unfold, window
from tengrad.layers.conv import conv_terms
from tengrad_ir import LayerSpec

CONVS = [
    ("1d_basic", lambda: nn.Conv1d(2, 3, 3), (2, 2, 7)),
    ("1d_stride2_dil2_pad3", lambda: nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=3), (2, 2, 9)),
    ("1d_same_even", lambda: nn.Conv1d(2, 2, 4, padding="same"), (1, 2, 6)),
    ("2d_pad1", lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 6)),
    ("2d_stride2_pad1", lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 2, 7, 7)),
    ("2d_rect_tuple", lambda: nn.Conv2d(2, 3, (3, 2), stride=(1, 2), dilation=(2, 1), padding=(2, 1)), (2, 2, 6, 7)),
    ("2d_groups2", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (2, 4, 5, 5)),
    ("2d_depthwise_stride3", lambda: nn.Conv2d(3, 3, 2, groups=3, stride=3), (2, 3, 8, 7)),
    ("2d_big_pad", lambda: nn.Conv2d(1, 2, 3, padding=4), (1, 1, 3, 4)),
    ("2d_same_dil", lambda: nn.Conv2d(2, 2, 3, dilation=2, padding="same"), (2, 2, 6, 5)),
    ("2d_valid_1x1", lambda: nn.Conv2d(3, 2, 1, padding="valid"), (2, 3, 4, 4)),
    ("3d_stride2_pad1", lambda: nn.Conv3d(2, 2, 3, stride=2, padding=1), (1, 2, 5, 4, 5)),
    ("3d_depthwise", lambda: nn.Conv3d(2, 2, 2, groups=2, dilation=(1, 2, 1)), (2, 2, 3, 5, 3)),
]


def unfold_by_maps(spec: LayerSpec, x: torch.Tensor, y_shape, w_shape) -> tuple[torch.Tensor, dict]:
    """The code under test: U from the maps as a strided view, one dim per spec.unfolded_indices."""
    sizes = bind_sizes(spec, [(spec.input_axes, tuple(x.shape), "x"), (spec.output_axes, tuple(y_shape), "y"),
                              (spec.param_axes, tuple(w_shape), "w")])
    xt = to_indexed(x, spec.input_axes, sizes, "x")
    xw = window(xt, spec.raw_input_indices, spec, sizes)
    return strided_unfold(xw, spec.raw_input_indices, spec.unfolded_indices, spec, sizes), sizes


def unfold_dense(spec: LayerSpec, x: torch.Tensor, sizes: dict) -> torch.Tensor:
    """U = X contracted with one dense 0/1 pattern per map (einconv's construction)."""
    xt = x.reshape([sizes[i] for i in spec.raw_input_indices])
    letters = {}

    def letter(i):
        return letters.setdefault(i, chr(ord("a") + len(letters)))

    operands, subs = [xt.double()], ["".join(letter(i) for i in spec.raw_input_indices)]
    for mp in spec.maps:
        variables = mp.variables
        pat = torch.zeros([sizes[v] for v in variables] + [sizes[mp.target]], dtype=torch.float64)
        for point in itertools.product(*(range(sizes[v]) for v in variables)):
            target = mp.offset + sum(mp.coeffs[v] * point[k] for k, v in enumerate(variables))
            if 0 <= target < sizes[mp.target]:
                pat[point + (target,)] = 1.0
        operands.append(pat)
        subs.append("".join(letter(v) for v in variables) + letter(mp.target))
    out = "".join(letter(i) for i in spec.unfolded_indices)
    return torch.einsum(",".join(subs) + "->" + out, *operands)


@pytest.mark.parametrize("case", CONVS, ids=[c[0] for c in CONVS])
def test_index_map_unfold_equals_dense_pattern_and_F_unfold(case):
    _, make, shape = case
    torch.manual_seed(0)
    mod = make()
    x = torch.randn(shape, dtype=torch.float64)
    y_shape = mod.double()(x).shape
    spec = conv_terms(mod)[0].spec
    u, sizes = unfold_by_maps(spec, x, y_shape, mod.weight.shape)
    dense = unfold_dense(spec, x, sizes)
    assert u.shape == dense.shape
    assert torch.equal(u, dense)  # both copy input values or zeros: exact
    if len(shape) == 4:  # F.unfold: [n, (C kh kw), (oh ow)] with C = (g ci)
        ref = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod._reversed_padding_repeated_twice[::2][::-1]
                       if isinstance(mod.padding, str) else mod.padding, stride=mod.stride)
        s = spec.unfolded_indices  # n g ci k0 o0 k1 o1 (maps' variables in place of each target)
        order = ["n", "g", "ci", "k0", "k1", "o0", "o1"]
        mine = u.permute([s.index(i) for i in order]).reshape(ref.shape)
        assert torch.equal(mine, ref)


@pytest.mark.parametrize("equation,maps,x_shape,w_shape,y_shape", [
    ("n ci ih, co ci -> n co oh", {"ih": "2*oh + 1"}, (2, 3, 9), (4, 3), (2, 4, 4)),           # subsample
    ("n ci ih, co ci kh -> n co oh", {"ih": "oh + 3*kh - 2"}, (2, 2, 6), (3, 2, 2), (2, 3, 5)),  # crop + pad
    ("n ih, co kh kw -> n co oh", {"ih": "2*oh + 2*kh + kw"}, (2, 11), (3, 2, 3), (2, 3, 4)),   # two kernels
])
def test_general_maps_equal_the_dense_pattern(equation, maps, x_shape, w_shape, y_shape):
    spec = LayerSpec.parse(equation, maps=maps)
    x = torch.randn(x_shape, dtype=torch.float64)
    sizes = bind_sizes(spec, [(spec.input_axes, x_shape, "x"), (spec.output_axes, y_shape, "y"),
                              (spec.param_axes, w_shape, "w")])
    xt = to_indexed(x, spec.input_axes, sizes, "x")
    u = strided_unfold(window(xt, spec.raw_input_indices, spec, sizes), spec.raw_input_indices,
                       spec.unfolded_indices, spec, sizes)
    assert torch.equal(u, unfold_dense(spec, x, sizes))


CONV_TRANSPOSES = [
    ("t1d_stride2_pad1", lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1), (2, 2, 5)),
    ("t1d_dil2_bigpad", lambda: nn.ConvTranspose1d(2, 2, 3, dilation=2, padding=3), (2, 2, 6)),
    ("t2d_groups2_rect", lambda: nn.ConvTranspose2d(4, 2, (3, 2), stride=(1, 3), padding=(1, 0), groups=2), (2, 4, 4, 3)),
    ("t3d_stride2", lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, padding=1, output_padding=1), (1, 2, 3, 2, 3)),
]


@pytest.mark.parametrize("case", CONV_TRANSPOSES, ids=[c[0] for c in CONV_TRANSPOSES])
def test_output_map_unfold_equals_dense_pattern(case):
    """GU (the output gradient read through a transposed conv's output maps, as the torch backend's
    UnfoldOutput builds it) against G contracted with dense 0/1 patterns P[i, k, o] = [o == s*i + d*k - p
    and 0 <= o < N_o]."""
    _, make, shape = case
    torch.manual_seed(0)
    mod = make()
    spec = tengrad.compile(mod).terms[0].spec
    x = torch.randn(shape, dtype=torch.float64)
    y_shape = mod.double()(x).shape
    sizes = bind_sizes(spec, [(spec.input_axes, tuple(x.shape), "x"), (spec.output_axes, tuple(y_shape), "y"),
                              (spec.param_axes, tuple(mod.weight.shape), "w")])
    g = torch.randn(y_shape, dtype=torch.float64)
    gt = to_indexed(g, spec.output_axes, sizes, "g")
    gw = window(gt, spec.output_indices, spec, sizes, maps=spec.out_maps)
    got = strided_unfold(gw, spec.output_indices, spec.unfolded_output_indices, spec, sizes, maps=spec.out_maps)
    letters = {}

    def letter(i):
        return letters.setdefault(i, chr(ord("a") + len(letters)))

    operands, subs = [gt], ["".join(letter(i) for i in spec.output_indices)]
    for mp in spec.out_maps:
        pat = torch.zeros([sizes[v] for v in mp.variables] + [sizes[mp.target]], dtype=torch.float64)
        for point in itertools.product(*(range(sizes[v]) for v in mp.variables)):
            target = mp.offset + sum(mp.coeffs[v] * point[k] for k, v in enumerate(mp.variables))
            if 0 <= target < sizes[mp.target]:
                pat[point + (target,)] = 1.0
        operands.append(pat)
        subs.append("".join(letter(v) for v in mp.variables) + letter(mp.target))
    want = torch.einsum(",".join(subs) + "->" + "".join(letter(i) for i in spec.unfolded_output_indices), *operands)
    assert got.shape == want.shape and torch.equal(got, want)
