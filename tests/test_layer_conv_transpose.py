"""ConvTranspose1d/2d/3d: index maps on the output (the output gradient read through them).

The layer itself is oracle-tested with every order, f64 and f32, in test_layer_cases_vs_oracle.py (cases
``convt*`` of support/layer_cases.py) and with hypothesis configurations in test_layer_hypothesis_vs_oracle.py. Here: the
IR of output maps (roles, validation, costs summed over the steps, layers without output maps
unchanged), the pure spec function, the triton backend refusing the layer by name (and 'auto'
choosing torch for it), and a CNN with ConvTranspose2d + GroupNorm stepped against the dense
float64 oracle.
"""
from __future__ import annotations

import pytest
import sympy
import torch
from torch import nn

import tengrad
from tengrad.layers import conv_transpose_terms
from tengrad_ir import LayerSpec, SizedPlan, SpecError, enumerate_orders
from tengrad_ir.geometry import transposed_geometry
from tengrad_ir.orders import N_C, N_I, N_K, N_O, N_P, N_Vr, N_g, N_v, m
from support.optim_cases import perturb_parameters
from support.step_oracle import run_against_oracle

EQ = "n (g ci) i0 i1, (g ci) co k0 k1 -> n (g co) o0 o1"
MAPS = {"o0": "2*i0 + k0 - 1", "o1": "i1 + 3*k1"}


def _spec():
    return LayerSpec.parse(EQ, name="T.weight", maps=MAPS, sizes={"g": 2})


def test_roles_follow_the_unfolded_output():
    s = _spec()
    assert s.roles == {"n": "batch", "g": "group", "ci": "independent", "i0": "common", "i1": "common",
                       "co": "free", "k0": "free", "k1": "free"}
    assert s.maps == () and [str(mp) for mp in s.out_maps] == ["o0 = 2*i0 + k0 - 1", "o1 = i1 + 3*k1"]
    assert s.unfolded_output_indices == ("n", "g", "co", "i0", "k0", "i1", "k1")
    geo = transposed_geometry(s)
    assert geo.stride == (2, 1) and geo.dilation == (1, 3) and geo.offset == (-1, 0)


@pytest.mark.parametrize("maps, needle", [
    ({"o0": "2*i0 + k0", "i1": "o1 + k1"}, "index maps on both input"),
    ({"o0": "2*i0 + co", "o1": "i1 + k1"}, "'co' of output map"),
    ({"o0": "2*i0 + k0 + n", "o1": "i1 + k1"}, "uses the batch index"),
])
def test_contradicting_output_maps_are_rejected_by_name(maps, needle):
    with pytest.raises(SpecError) as info:
        LayerSpec.parse(EQ, name="T.weight", maps=maps, sizes={"g": 2})
    assert needle in str(info.value) and "T.weight" in str(info.value)


def test_costs_are_the_sum_of_the_steps():
    orders = enumerate_orders(_spec())
    for q, os in orders.items():
        for o in os:
            assert sympy.simplify(o.flops - sum(st.flops for st in o.steps)) == 0
    gram = {o.name: o for o in orders["gram"]}
    assert set(gram) == {"direct", "factored", "factored_raw"}
    assert sympy.simplify(gram["direct"].flops - 2 * m * N_g * N_v * N_I * (N_C + m)) == 0
    assert sympy.simplify(gram["factored"].flops - 2 * m**2 * N_g * N_C**2 * (N_I + N_v + 1)) == 0
    assert sympy.simplify(gram["factored_raw"].flops - m**2 * N_g * (2 * N_C**2 * N_I + 2 * N_Vr * N_P**2
                                                                      + N_C**2 * N_K + 2 * N_C**2)) == 0
    assert [st.op for st in gram["factored"].steps] == ["contract", "unfold_output", "contract", "contract"]
    assert [st.op for st in gram["factored_raw"].steps] == ["contract", "contract", "raw_cov_unfold", "contract"]
    assert [t.name for t in gram["factored_raw"].steps[1].inputs] == ["G", "G'"]   # R on the raw gradient
    assert [st.op for st in {o.name: o for o in orders["jvp"]}["forward"].steps] == ["conv_transpose_forward",
                                                                                     "contract"]
    vjp = {o.name: o for o in orders["vjp"]}
    assert [st.op for st in vjp["weight_grad"].steps] == ["contract", "conv_transpose_weight_grad"]
    assert [t.name for t in vjp["scaled_input"].steps[1].inputs] == ["Uu", "G"]   # u scales X, not G
    # Gu = u G on the real output [n, g, Vr, O]; Uu = u X on the input [n, g, I, C]
    assert sympy.simplify(vjp["weight_grad"].flops - vjp["scaled_input"].flops
                          - m * N_g * (N_Vr * N_O - N_I * N_C)) == 0


def test_layers_without_output_maps_are_unchanged():
    conv = LayerSpec.parse("n (g ci) ih, (g co) ci kh -> n (g co) oh", name="c", maps={"ih": "2*oh + kh - 1"},
                           sizes={"g": 1})
    assert conv.out_maps == () and conv.unfolded_output_indices == conv.output_indices
    ops = {o.name: [st.op for st in o.steps] for o in enumerate_orders(conv)["gram"]}
    assert ops == {"direct": ["conv_weight_grad", "symmetric_gram"],
                   "factored": ["unfold", "contract", "contract", "contract"],
                   "factored_raw": ["contract", "raw_cov_unfold", "contract", "contract"]}


@pytest.mark.parametrize("module", [
    nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, dilation=2, groups=2),
    nn.ConvTranspose2d(3, 3, (2, 3), stride=(2, 1), padding=(0, 1), groups=3, bias=False),
    nn.ConvTranspose3d(2, 4, 2, stride=2, output_padding=1),
], ids=["1d", "2d", "3d"])
def test_pure_spec_function_equals_the_module_factory(module):
    terms = conv_transpose_terms(len(module.kernel_size), module.stride, module.padding, module.output_padding,
                                 module.dilation, module.groups, module.bias is not None,
                                 module.in_channels, module.out_channels, name=type(module).__name__)
    plan = tengrad.compile(module)
    assert [(t.param, t.spec) for t in terms] == [(t.param, t.spec) for t in plan.terms]


def test_spec_function_rejects_bad_hyperparameters_by_name():
    with pytest.raises(tengrad.TengradError, match="ConvTranspose2d: in_channels=5 is not divisible by groups=2"):
        conv_transpose_terms(2, 1, 0, 0, 1, 2, True, in_channels=5, out_channels=4)
    with pytest.raises(tengrad.TengradError, match="ConvTranspose1d: stride must be an int or 1 ints"):
        conv_transpose_terms(1, (1, 2), 0, 0, 1, 1, True)


def test_triton_refuses_the_layer_by_name_and_auto_runs_torch():
    pytest.importorskip("triton", reason="triton is not installed")
    from tengrad.codegen.backend import backend_named

    triton = backend_named("triton")
    mod = nn.ConvTranspose2d(2, 3, 3, stride=2)
    sizes = dict(n=2, g=1, ci=2, co=3, i0=3, i1=3, k0=3, k1=3, o0=7, o1=7)
    plan = SizedPlan(tengrad.compile(mod).terms[0].spec, tuple(sizes.items()), backend=triton)
    with pytest.raises(SpecError) as info:
        plan.choice
    assert "ConvTranspose2d.weight" in str(info.value) and "triton backend runs no" in str(info.value)
    with pytest.raises(tengrad.TengradError, match="ConvTranspose2d.weight: the triton backend runs no gram order"):
        tengrad.compile(mod, backend="triton").orders("gram")       # the public API refuses it by name
    assert tengrad.compile(mod, backend="auto")._auto(triton).name == "torch"
    assert tengrad.compile(nn.Conv2d(2, 3, 3), backend="auto")._auto(triton).name == "triton"


class UpNet(nn.Module):
    """conv (stride 2) -> GroupNorm -> tanh -> ConvTranspose2d (stride 2, padding 1, output_padding 1,
    called with output_size=(5, 5), as U-Nets do: torch then uses output_padding 0) -> GroupNorm ->
    tanh -> depthwise ConvTranspose2d -> mean over positions -> Linear; input [m, 4, 5, 5], output [m, 3]."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.gn1 = nn.GroupNorm(2, 6)
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1)
        self.gn2 = nn.GroupNorm(2, 4)
        self.dw = nn.ConvTranspose2d(4, 4, 2, groups=4, dilation=2, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.gn1(self.down(x)))
        h = torch.tanh(self.gn2(self.up(h, output_size=(5, 5))))
        return self.head(self.dw(h).mean((2, 3)))


@pytest.mark.parametrize("fisher, path", [("empirical", "auto"), ("exact", "auto"), ("mc", "auto"),
                                          ("empirical", "reuse")])
def test_convtranspose_groupnorm_cnn_matches_dense_oracle(fisher, path):
    """path "reuse" forbids explicit Jacobians, so the blocks run plan.gram/jvp/vjp on x and gy."""
    torch.manual_seed(0)
    model = UpNet().double()
    gen = torch.Generator().manual_seed(1)
    perturb_parameters(model, gen)
    extra = {"max_jacobian_numel": 0} if path == "reuse" else {}
    opt = run_against_oracle("conv", fisher, "cross_entropy", k=1, sizes=[5, 3], model=model, **extra)
    assert {b.name for b in opt.blocks} == {"down", "gn1", "up", "gn2", "dw", "head"}
    if path == "reuse":
        assert all(b.choice.path == "reuse" for b in opt.blocks)
    assert not opt.fallback


def test_output_size_in_the_forward_gives_the_layer_of_that_size():
    """``up(x, output_size=...)`` picks another output_padding; gy then has that size, and the plan of
    the module (built with its own output_padding) is exact for it: the oracle is the module with the
    output_padding torch chose. A gy of another channel count still raises naming the layer."""
    from support.jacobian_oracle import compare_plan, per_sample_jacobian

    gen = torch.Generator().manual_seed(5)
    mod = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1).double()               # output 9x9 for 5x5
    same = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1).double()
    same.load_state_dict(mod.state_dict())
    x = torch.randn(3, 2, 5, 5, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(mod(x, output_size=(10, 10)), same(x))
    gy = torch.randn(3, 3, 10, 10, generator=gen, dtype=torch.float64)
    J = per_sample_jacobian(same, x, gy)
    p = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (mod.weight, mod.bias)]
    u = torch.randn(3, generator=gen, dtype=torch.float64)
    plan = tengrad.compile(mod)
    failures = compare_plan(plan, mod, x, gy, J, p, u, 1e-10)
    assert not failures, failures
    with pytest.raises(tengrad.ShapeError, match="ConvTranspose2d: gy has shape"):
        plan.gram(x, torch.randn(3, 4, 10, 10, dtype=torch.float64))


class SkewScatter(nn.Module):
    """A user layer with an output map that is not a transposed convolution (two common variables in
    one map): y[n, c, o] = sum over (i, j, k) with o = i + 3 j + k - 1 of x[n, c, i, j] w[c, k], cropped
    to [0, 6). It runs the generic output-map steps (UnfoldOutput + contractions) in every order."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3))

    def forward(self, x):                                  # x [n, 2, 3, 2]
        n = x.shape[0]
        y = x.new_zeros(n, 2, 6)
        for i in range(3):
            for j in range(2):
                for k in range(3):
                    o = i + 3 * j + k - 1
                    if 0 <= o < 6:
                        y = y.index_add(2, torch.tensor([o], device=x.device), (x[:, :, i, j] * self.weight[:, k])[..., None])
        return y


def skew_terms(module):
    spec = LayerSpec.parse("n c i j, c k -> n c o", name="SkewScatter.weight", maps={"o": "i + 3*j + k - 1"})
    return [tengrad.Term("weight", spec)]


def test_generic_output_map_runs_every_order_against_the_oracle():
    from support.jacobian_oracle import compare_plan, per_sample_jacobian
    from support.steps_as_printed import check_layer

    tengrad.register_layer(SkewScatter, skew_terms)
    gen = torch.Generator().manual_seed(3)
    mod = SkewScatter().double()
    x = torch.randn(4, 2, 3, 2, generator=gen, dtype=torch.float64)
    gy = torch.randn(4, 2, 6, generator=gen, dtype=torch.float64)
    spec = skew_terms(mod)[0].spec
    assert transposed_geometry(spec) is None
    assert spec.roles == {"n": "batch", "c": "group", "i": "common", "j": "common", "k": "free"}
    orders = enumerate_orders(spec)
    assert "unfold_output" in [st.op for st in orders["jacobian"][0].steps]
    assert {o.name for o in orders["gram"]} == {"direct", "factored", "factored_raw"}
    J = per_sample_jacobian(mod, x, gy)
    p = [torch.randn(2, 3, generator=gen, dtype=torch.float64)]
    u = torch.randn(4, generator=gen, dtype=torch.float64)
    failures = compare_plan(tengrad.compile(mod), mod, x, gy, J, p, u, 1e-10)
    assert not failures, failures
    bad = check_layer(tengrad.compile(mod), x, gy, gen)        # what prints is what runs
    assert not bad, "\n".join(bad)
