"""Bounded, cheap planning (issue 21, item 3): every order's compiled cost function equals its sympy
formula substituted (the oracle), the output shape read off a built-in layer's spec equals the
module's own on the meta device, and the caches keyed by shape (plans, output shapes, path choices,
op plans) hold at most their bound while a loop meets a new shape at every step."""
from __future__ import annotations

import random
import warnings

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import nn

import tengrad
from support.layer_cases import CASES, make_setup_input
from tengrad.compiler import binding, compiled
from tengrad.optim.curvature import block as block_mod
from tengrad_ir import enumerate_orders
from tengrad_ir.cost_fn import CLASS_SYMBOLS, compile_expr
from tengrad_ir.lru import LRU


def _compiled(case):
    try:
        return tengrad.compile(case.make_module())
    except tengrad.TengradError:      # a configuration the library refuses (allow_error cases)
        return None


def test_compiled_costs_equal_the_substituted_formulas():
    """At random sizes (seeded) for every order of one spec per kind of layer term among the layer
    cases (sympy's substitution, the oracle, is slow: one spec per term name)."""
    rng = random.Random(0)
    specs = {}
    for c in CASES:
        plan = _compiled(c)
        for t in plan.terms if plan is not None else ():
            specs.setdefault(t.spec.name, t.spec)
    assert len(specs) > 8
    for spec in specs.values():
        for orders in enumerate_orders(spec).values():
            for o in orders:
                values = {s: rng.randint(1, 5000) for s in CLASS_SYMBOLS}
                flops, memory = o.cost_fns
                assert flops(values) == int(o.flops.subs(values)), (spec.name, o.name)
                assert memory(values) == int(sympy.sympify(o.memory).subs(values)), (spec.name, o.name)


def test_a_rational_formula_is_exact():
    a, b = CLASS_SYMBOLS[0], CLASS_SYMBOLS[1]
    e = sympy.Rational(7, 3) * a ** 3 * b + a / 2 + 10 ** 30 * b
    f = compile_expr(e)
    for va, vb in [(1, 1), (12345, 678), (2 ** 40, 3)]:
        values = {s: 1 for s in CLASS_SYMBOLS} | {a: va, b: vb}
        assert f(values) == int(e.subs(values))


def test_output_shape_from_the_spec_equals_the_module_run():
    derived = 0
    for case in CASES:
        plan = _compiled(case)
        if plan is None:
            continue
        x = make_setup_input(case, torch.Generator().manual_seed(0), torch.float32)
        shape = plan.shapes._from_spec(tuple(x.shape))
        if shape is None:       # maps, a shape-changing pre-map: the meta run is the only answer
            continue
        derived += 1
        with torch.no_grad():
            assert shape == tuple(case.make_module()(x).shape), case.id
    assert derived > 10


def test_lru_keeps_the_most_recently_used():
    c = LRU(3)
    for k in "abc":
        c[k] = k.upper()
    assert c.get("a") == "A"           # a used: b is now the oldest
    c["d"] = "D"
    assert "b" not in c and len(c) == 3 and set(c) == {"a", "c", "d"}
    with pytest.raises(ValueError, match="maxsize"):
        LRU(0)


def test_caches_stay_bounded_over_many_new_shapes(monkeypatch):
    """A Transformer-like model fed a new sequence length at every step: the per-shape caches never
    hold more than their bound (bounds lowered here to keep the test small)."""
    monkeypatch.setattr(compiled, "PLANS_KEPT", 4)
    monkeypatch.setattr(binding, "OUTPUTS_KEPT", 4)
    monkeypatch.setattr(block_mod, "CHOICES_KEPT", 3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 8), nn.LayerNorm(8), nn.Linear(8, 9)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = tengrad.TENGraD(model, update_freq=1)
    gen = torch.Generator().manual_seed(0)
    for t in range(3, 15):
        x = torch.randint(0, 9, (2, t), generator=gen)
        y = torch.randint(0, 9, (2, t), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x).reshape(-1, 9), y.reshape(-1)).backward()
        opt.step()
    for b in opt.blocks:
        assert len(b.plan._plans) <= 4 and len(b.plan.shapes._out) <= 4, b.name
        assert len(b.choices) <= 3, b.name
