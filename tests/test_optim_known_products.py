"""The step's <d, g> of Woodbury blocks from their solves (update.Known): <d, g> = beta |g|^2 + u^T (R g),
never reading d, against the dot of the formed d and g (update.dots without ``known``) on the same step.

Cases: reuse-path blocks batched (grouped.py), small explicit-J blocks stacked (stacked.py), blocks on
their own (both off), a convolution net, a Transformer LM with a tied head, Adam's diagonal prior
(d = S d'), param groups with different damping and weight decay, and a block with one parameter whose
gradient is None (its product read from d, like the fallback parameters'). float64 models to 1e-10;
float32 to the float32 rounding of the formed d (1e-4 of sum |d| |g|). A non-finite gradient is still
reported through the known products."""
import warnings

import pytest
import torch

from tengrad.optim import TENGraD, update
from tengrad.optim.curvature import grouped, stacked
from tengrad.optim.errors import TENGraDError

from support.optim_cases import LOSSES, make_batch, make_model, perturb_parameters
from test_optim_grouped import TokenTower


def _steps(model, x, y, n=3, before_step=None, **kw):
    """Run n TENGraD steps; [(products the step used, formed dots, the directions' |d| |g| sum, known?)],
    the products summed per known block (``_per_block``)."""
    seen, knowns = [], []
    real = update.check_finite

    def spy(directions, labels, products=None):
        formed = update.dots(directions)
        scale = sum(float(d.norm() * g.norm()) for _, d, g, _ in directions if not isinstance(d, update.Deferred))
        known = knowns.pop() if knowns else None
        seen.append((_per_block(products, known), _per_block(formed, known), scale, known is not None))
        return real(directions, labels, products)

    class Spy(update.Known):
        def __init__(self, *args):
            super().__init__(*args)
            knowns.append(self)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, **{"prior": None, "step_rule": "natural", **kw})
    update_check, update_known = update.check_finite, update.Known
    update.check_finite, update.Known = spy, Spy
    try:
        for _ in range(n):
            opt.zero_grad()
            LOSSES["cross_entropy"](model(x), y).backward()
            if before_step is not None:
                before_step(model)
            opt.step()
    finally:
        update.check_finite, update.Known = update_check, update_known
    return opt, seen


def _per_block(products, known):
    """The products summed over each known block (they sit on its first parameter), the others as they are."""
    if known is None:
        return products.clone()
    out, k = [], 0
    starts = set(known.at)
    while k < len(products):
        if k in starts:
            end = k + 1
            while end < len(products) and end in known.covered and end not in starts:
                end += 1
            out.append(products[k:end].sum())
            k = end
        else:
            out.append(products[k])
            k += 1
    return torch.stack(out)


def _batch(kind, dtype, m=6):
    gen = torch.Generator().manual_seed(1)
    return make_batch(kind, m, "cross_entropy", gen, dtype) if kind != "tower" else (
        torch.randn(m, 5, generator=gen, dtype=dtype), torch.randint(0, 3, (m,), generator=gen))


def _model(kind, dtype):
    if kind == "tower":
        torch.manual_seed(0)
        model = TokenTower().to(dtype)
    else:
        model = make_model(kind, dtype)
    perturb_parameters(model, torch.Generator().manual_seed(2))
    return model


CASES = {
    "grouped": ("tower", dict(max_jacobian_numel=0)),
    "stacked": ("tower", dict()),
    "each on its own": ("tower", dict(max_jacobian_numel=0, small=0)),
    "conv": ("conv", dict()),
    "conv reuse": ("conv", dict(max_jacobian_numel=0)),
    "token": ("token", dict()),
    "adam prior": ("tower", dict(max_jacobian_numel=0, prior="adam")),
    "soap prior": ("tower", dict(prior="soap", update_freq=1)),      # steps 1, 2: the eigenbasis (eigenbasis.py)
    "soap prior, tokens": ("token", dict(prior="soap", update_freq=1)),
    "weight decay, update_freq 2": ("mlp", dict(weight_decay=0.1, update_freq=2)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CASES))
def test_known_products_equal_the_formed_dots(monkeypatch, case, dtype):
    kind, kw = CASES[case]
    kw = dict(kw)
    if kw.pop("small", None) == 0:
        monkeypatch.setattr(grouped, "SMALL", 0)
        monkeypatch.setattr(stacked, "SMALL", 0)
    model = _model(kind, dtype)
    x, y = _batch(kind, dtype)
    opt, seen = _steps(model, x, y, lr=0.1, damping=0.3, **kw)
    assert seen and all(used for *_, used in seen), "the known products were not used"
    if case == "grouped":
        assert opt.estimator._groups, "no group ran"
    if case == "stacked":
        assert opt.estimator._stacks, "no stack ran"
    for got, want, scale, _ in seen:
        assert got.shape == want.shape
        tol = 1e-10 * scale if dtype == torch.float64 else 1e-4 * scale
        assert float((got - want).abs().max()) <= tol, (got, want)
        assert float(got.sum()) > 0


def test_param_groups_with_their_own_damping_and_a_missing_gradient():
    model = _model("tower", torch.float64)
    x, y = _batch("tower", torch.float64)
    groups = [{"params": list(model.a.parameters()) + list(model.head.parameters()), "damping": 2.0,
               "weight_decay": 0.05},
              {"params": [p for n, p in model.named_parameters() if not n.startswith(("a.", "head."))]}]

    def drop_bias(m):
        m.b.bias.grad = None            # block b: one parameter without a gradient (its d is read, not known)
    opt, seen = _steps(model, x, y, before_step=drop_bias, param_groups=groups, lr=0.1, damping=0.3,
                       max_jacobian_numel=0)
    assert len(opt.param_groups) == 2
    for got, want, scale, used in seen:
        assert used
        assert float((got - want).abs().max()) <= 1e-10 * scale


def test_a_non_finite_gradient_is_still_reported():
    model = _model("tower", torch.float32)
    x, y = _batch("tower", torch.float32)

    def poison(m):
        m.b.weight.grad[0, 0] = float("nan")
    with pytest.raises(TENGraDError, match="non-finite gradient"):
        _steps(model, x, y, n=1, before_step=poison, lr=0.1, damping=0.3, max_jacobian_numel=0)
