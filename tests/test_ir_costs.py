"""Closed-form costs: each Gram order's sympy FLOP formula equals opt_einsum's count for the same
path, and the choice is the cheapest order that fits the memory cap."""
import itertools

import opt_einsum
import pytest
import sympy

from tengrad_ir import LayerSpec, SizedPlan
from tengrad_ir.derive import derive
from tengrad_ir.orders import N_C, N_I, N_g, N_v, m

SPECS = {
    "conv2d": (LayerSpec.parse("n (g ci) ih iw, (g co) ci kh kw -> n (g co) oh ow",
                               maps={"ih": "oh + kh - 1", "iw": "ow + kw - 1"}, sizes={"g": 1}),
               lambda m_, c, h: dict(n=m_, g=1, ci=c, co=c, kh=3, kw=3, oh=h, ow=h, ih=h, iw=h)),
    "grouped": (LayerSpec.parse("n (g ci) ih, (g co) ci kh -> n (g co) oh",
                                maps={"ih": "2*oh + kh"}, sizes={"g": 4}),
                lambda m_, c, h: dict(n=m_, g=4, ci=c, co=2 * c, kh=3, oh=h, ih=2 * h + 2)),
    "conv_transpose": (LayerSpec.parse("n (g ci) i0, (g ci) co k0 -> n (g co) o0",
                                       maps={"o0": "2*i0 + k0 - 1"}, sizes={"g": 2}),   # an output map
                       lambda m_, c, h: dict(n=m_, g=2, ci=c, co=c, k0=3, i0=h, o0=2 * h)),
    "linear_seq": (LayerSpec.parse("n t i, o i -> n t o"), lambda m_, c, h: dict(n=m_, t=h, i=c, o=2 * c)),
    "linear_2d": (LayerSpec.parse("n i, o i -> n o"), lambda m_, c, h: dict(n=m_, i=c, o=c + 3)),
    "layernorm": (LayerSpec.parse("n t d, d -> n t d"), lambda m_, c, h: dict(n=m_, t=h, d=c)),
}
SIZES = [(4, 8, 5), (32, 64, 7), (128, 16, 28)]


def opt_einsum_count(spec, values, path):
    """opt_einsum's FLOP count of the 4-operand Gram einsum U G U' G' -> K along ``path``."""
    d = derive(spec, collapse=True)
    u, g = d.cov_input.operands[0], d.cov_grad.operands[0]
    u2, g2 = d.cov_input.operands[1], d.cov_grad.operands[1]
    size = {"n": m, "n'": m, "g": N_g, "v": N_v, "I": N_I, "C": N_C, "C'": N_C}
    ops = [u, g, u2, g2]
    names = list(dict.fromkeys(i for t in ops for i in t.indices))
    letter = {n: chr(ord("a") + k) for k, n in enumerate(names)}
    eq = ",".join("".join(letter[i] for i in t.indices) for t in ops) + "->" + letter["n"] + letter["n'"]
    shapes = [tuple(int(size[i].subs(values)) for i in t.indices) for t in ops]
    _, info = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize=list(path))
    return int(info.opt_cost)


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("dims", SIZES)
def test_gram_formulas_equal_opt_einsum(name, dims):
    spec, make = SPECS[name]
    plan = SizedPlan(spec, tuple(make(*dims).items()))
    checked = 0
    for order in plan.orders["gram"]:
        if order.einsum_path is None:
            continue
        formula = int(order.einsum_flops.subs(plan.values))
        assert formula == opt_einsum_count(spec, plan.values, order.einsum_path), order.name
        checked += 1
    assert checked == 2  # direct and factored are both einsum paths


def test_direct_forms_the_jacobian_once():
    spec, make = SPECS["conv2d"]
    plan = SizedPlan(spec, tuple(make(8, 4, 6).items()))
    direct = plan.order("gram", "direct")
    jac = derive(spec, collapse=True).jacobian.flops(lambda i: {"n": m, "g": N_g, "v": N_v, "I": N_I, "C": N_C}[i])
    assert sympy.simplify(direct.einsum_flops - direct.flops - jac) == 0


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("dims", SIZES)
@pytest.mark.parametrize("cap", [2**40, 2**24, 2**16])
def test_choice_is_cheapest_that_fits(name, dims, cap):
    spec, make = SPECS[name]
    plan = SizedPlan(spec, tuple(make(*dims).items()), itemsize=4, memory_cap=cap)
    for q in ("gram", "jvp", "vjp"):
        costs = {o.name: plan.cost(q, o.name) for o in plan.orders[q]}
        fitting = {k: c for k, c in costs.items() if c.memory * 4 <= cap}
        chosen = plan.choice[q]
        if fitting:
            assert chosen in fitting
            assert costs[chosen].flops == min(c.flops for c in fitting.values())
        else:
            assert costs[chosen].memory == min(c.memory for c in costs.values())


def test_choice_flips_where_the_paper_says():
    """Corollary 2: factored for a linear layer, direct for an early conv on a large map."""
    conv, make = SPECS["conv2d"]
    assert SizedPlan(conv, tuple(make(128, 128, 28).items())).choice["gram"] == "direct"
    lin, make = SPECS["linear_2d"]
    assert SizedPlan(lin, tuple(make(128, 1024, 1).items())).choice["gram"] == "factored"
    late = SizedPlan(conv, tuple(SPECS["conv2d"][1](128, 256, 4).items()))
    assert late.choice["gram"] in ("factored", "factored_raw")


def test_plan_prints_roles_orders_costs_and_choice():
    spec, make = SPECS["conv2d"]
    text = repr(SizedPlan(spec, tuple(make(16, 8, 6).items())))
    for needle in ("roles", "batch n", "free co", "independent ci kh kw", "common oh ow",
                   "direct", "factored", "factored_raw", "chosen", "flop", "J[n,g,co,ci,kh,kw]"):
        assert needle in text


def test_raw_order_beats_unfolded_factored_by_the_kernel_size():
    spec, make = SPECS["conv2d"]
    plan = SizedPlan(spec, tuple(make(64, 256, 4).items()))
    assert plan.cost("gram", "factored_raw").flops < plan.cost("gram", "factored").flops / 2


@pytest.mark.parametrize("m_", [1, 2, 64, 512])
def test_costs_are_positive_integers(m_):
    for name, (spec, make) in SPECS.items():
        plan = SizedPlan(spec, tuple(make(m_, 8, 3).items()))
        for q, o in itertools.product(("gram", "jvp", "vjp"), range(2)):
            c = plan.cost(q, plan.orders[q][o].name)
            assert c.flops > 0 and c.memory >= 0, (name, q, o)


def test_scaled_input_vjp_wins_exactly_when_the_input_is_narrower():
    """vjp 'scaled_input' (u X, then G^T (u X)) against 'weight_grad' ((u G)^T X): the products cost
    the same; scaling costs m N_C N_I against m N_C N_v."""
    spec = SPECS["linear_seq"][0]
    for i, o, want in ((8, 64, "scaled_input"), (64, 8, "weight_grad")):
        plan = SizedPlan(spec, tuple(dict(n=16, t=5, i=i, o=o).items()))
        wg, si = plan.cost("vjp", "weight_grad").flops, plan.cost("vjp", "scaled_input").flops
        assert wg - si == 16 * 5 * (o - i)
        assert plan.choice["vjp"] == want
    conv = SPECS["conv2d"][0]
    assert "scaled_input" not in [o.name for o in SizedPlan(conv, tuple(SPECS["conv2d"][1](4, 3, 5).items())).orders["vjp"]]
