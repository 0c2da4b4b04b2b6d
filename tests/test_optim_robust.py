"""TENGraD robustness: dtypes, frozen params, capture rules, weight sharing, non-finite values,
resuming from a state_dict, momentum / weight decay / kl_clip, fallback parameters, path choice."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.numerics import rel_err
from support.optim_cases import LOSSES, make_batch, make_model
from support.step_oracle import expected_steps, oracle_fisher, per_sample_grads, run_against_oracle
from tengrad.optim import TENGraD, TENGraDError
from tengrad.optim.curvature import paths, woodbury


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def step_plain(model, opt, x, y, loss="cross_entropy"):
    opt.zero_grad()
    LOSSES[loss](model(x), y).backward()
    opt.step()


# ---------------------------------------------------------------- dtypes
def test_float32_matches_float64_oracle():
    model = make_model("conv", dtype=torch.float32)
    run_against_oracle("conv", "empirical", "cross_entropy", k=2, sizes=[6, 4, 5], model=model, tol=1e-4)


@pytest.mark.parametrize("fisher", ["empirical", "mc", "exact"])
def test_bf16_autocast_runs_gram_and_solve_in_float32(fisher):
    base = make_model("conv", dtype=torch.float32)
    x, y = make_batch("conv", 8, "cross_entropy", torch.Generator().manual_seed(0), dtype=torch.float32)
    moves = {}
    for mode in ("fp32", "bf16"):
        model = copy.deepcopy(base)
        opt = quiet(TENGraD, model, 0.1, 0.5, momentum=0.0, fisher=fisher,
                    generator=torch.Generator().manual_seed(1))
        before = snapshot(model)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            out = model(x)
        if mode == "bf16":
            assert out.dtype == torch.bfloat16
        opt.backward(out, y, loss="cross_entropy")
        opt.step()
        for b in opt.blocks:
            assert b.curv.gram.dtype == torch.float32 and b.curv.chol.dtype == torch.float32
        moves[mode] = torch.cat([(p.detach() - before[n]).reshape(-1) for n, p in model.named_parameters()])
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(moves["bf16"]).all()
    assert rel_err(moves["bf16"], moves["fp32"]) < 0.15        # bf16 forward/backward, fp32 solve


# ---------------------------------------------------------------- frozen parameters
def test_frozen_params_are_left_out_and_untouched():
    model = make_model("conv")
    model.conv2.weight.requires_grad_(False)
    for p in model.norm.parameters():
        p.requires_grad_(False)
    opt = run_against_oracle("conv", "empirical", "cross_entropy", k=2, sizes=[5, 3, 4], model=model)
    names = {b.name: b.param_names for b in opt.blocks}
    assert names["conv2"] == ["conv2.bias"] and names["norm"] == []        # frozen: a block with nothing to train
    assert all("norm" not in n and "conv2" not in n for n, _ in opt.fallback)
    assert opt.skipped["norm"].startswith("frozen") and "skipped at the last step: frozen" in opt.explain()


# ---------------------------------------------------------------- capture rules
@pytest.mark.parametrize("fisher", ["empirical", "mc", "exact"])
def test_inplace_activation_after_a_layer(fisher):
    # the hooks and gradient edges see the layer output before ReLU(inplace=True) rewrites it
    run_against_oracle("mlp", fisher, "cross_entropy", k=2, sizes=[4, 3, 5])


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_eval_and_no_grad_forwards_do_not_touch_curvature(fisher):
    base = make_model("tokens")
    gen = torch.Generator().manual_seed(0)
    batches = [make_batch("tokens", m, "cross_entropy", gen) for m in (6, 4, 5, 3)]
    other = make_batch("tokens", 9, "cross_entropy", gen)
    results = []
    for noisy in (False, True):
        model = copy.deepcopy(base)
        opt = TENGraD(model, 0.2, 0.3, update_freq=2, fisher=fisher, generator=torch.Generator().manual_seed(1), prior=None)
        for x, y in batches:
            if noisy:                                  # before the training forward
                model.eval()
                model(other[0]).sum().backward()       # eval mode, grad enabled: not captured
                model.train()
                with torch.no_grad():
                    model(other[0])                    # no_grad: not captured
            out = model(x)
            opt.zero_grad()
            opt.backward(out, y, loss="cross_entropy")
            if noisy:                                  # between backward and step
                model(other[0])                        # a training forward without backward
                model.eval()
                with torch.no_grad():
                    model(other[0])
                model.train()
            opt.step()
        results.append(snapshot(model))
    for n in results[0]:
        assert torch.equal(results[0][n], results[1][n]), n


def test_kept_input_does_not_alias_a_refilled_batch_buffer():
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (4,), generator=gen))
               for _ in range(3)]
    base = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    results = []
    for refill in (False, True):
        model = copy.deepcopy(base)
        opt = TENGraD(model, 0.1, 0.5, update_freq=3, max_jacobian_numel=0, prior=None)
        buffer = torch.empty(4, 3, dtype=torch.float64)
        for x, y in batches:
            if refill:
                x = buffer.copy_(x)                    # a loader that reuses one input buffer
            step_plain(model, opt, x, y)
        results.append(snapshot(model))
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.twice = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.twice(torch.tanh(self.twice(self.inp(x)))))


def test_module_called_twice_is_one_block_with_two_uses():
    """A module called twice in one forward is one block whose J sums both calls (exactness against
    the dense oracle: tests/test_optim_zoo.py::test_linear_applied_twice_matches_oracle)."""
    model = Shared().double()
    opt = TENGraD(model, 0.1, 0.5, prior=None)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    twice = next(b for b in opt.blocks if b.name == "twice")
    assert len(twice.uses) == 2 and twice.choice.path == "jacobian"


def test_gradients_accumulated_with_the_mc_fisher_are_refused_by_name():
    """Accumulation is exact for the empirical Fisher (tests/test_training_loops.py); the Monte-Carlo
    Fisher's curvature passes run per opt.backward, so two of them before a step are refused."""
    model = Shared().double()
    opt = TENGraD(model, 0.1, 0.5, fisher="mc", generator=torch.Generator().manual_seed(0), prior=None)
    before = snapshot(model)
    opt.zero_grad()
    for _ in range(2):
        x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
        opt.backward(model(x), y)
    with pytest.raises(TENGraDError, match="'inp'.*2 forward passes.*empirical Fisher"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_tied_weights_fall_back_with_a_warning():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.mid = nn.Linear(4, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.tanh(self.mid(self.emb(x)))).mean(1)

    model = Tied()
    with pytest.warns(UserWarning, match="shared") as rec:
        opt = TENGraD(model, 0.1, 0.5, prior=None)
    assert len(rec) == 1
    assert [b.name for b in opt.blocks] == ["mid"]
    assert [n for n, _ in opt.fallback] == ["emb.weight"]
    before = snapshot(model)
    step_plain(model, opt, torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (3,)))
    assert not torch.equal(model.emb.weight, before["emb.weight"])


def test_unsupported_module_warns_once_and_uses_damped_identity():
    with pytest.warns(UserWarning, match=r"act\.weight") as rec:
        TENGraD(make_model("conv"), 0.1, 0.5, prior=None)
    assert len([w for w in rec if "no layer plan" in str(w.message)]) == 1
    # the oracle test of the conv model checks d = g / damping for act.weight


# ---------------------------------------------------------------- errors leave everything untouched
def test_nonfinite_gradient_raises_and_touches_nothing():
    model = make_model("tokens")
    opt = TENGraD(model, 0.1, 0.5, momentum=0.9, update_freq=2, prior=None)
    gen = torch.Generator().manual_seed(0)
    step_plain(model, opt, *make_batch("tokens", 4, "cross_entropy", gen))
    params, bufs = snapshot(model), {p: s["momentum_buffer"].clone() for p, s in opt.state.items()}
    curv = {b.name: b.curv for b in opt.blocks}
    for name in ("lin1", "norm"):
        x, y = make_batch("tokens", 4, "cross_entropy", gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        getattr(model, name).weight.grad[0].fill_(float("nan"))
        with pytest.raises(TENGraDError, match=f"'{name}'.*non-finite"):
            opt.step()
        assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
        assert all(torch.equal(s["momentum_buffer"], bufs[p]) for p, s in opt.state.items())
        assert all(b.curv is curv[b.name] for b in opt.blocks)


def test_nonfinite_gram_raises_naming_the_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = TENGraD(model, 0.1, 0.5, check=None, prior=None)   # the gradients are edited below: no J^T 1/m check
    before = snapshot(model)
    x = torch.randn(5, 3, dtype=torch.float64)
    opt.zero_grad()
    out = model(x)
    # a huge output gradient: finite mean gradient, but K = J J^T overflows
    out.backward(torch.full_like(out, 1e200) * torch.tensor([1.0, -1.0], dtype=torch.float64))
    model[0].weight.grad.zero_()
    model[0].bias.grad.zero_()
    with pytest.raises(TENGraDError, match="'0'.*(Gram|non-finite)"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_cholesky_retries_with_ten_times_damping_then_names_the_layer():
    m, a = 2, 0.1
    gram = torch.diag(torch.tensor([-1.5 * m * a, 1.0], dtype=torch.float64))
    chol, used = woodbury.factor(gram, m, a, "blk")
    assert used == pytest.approx(10 * a)
    with pytest.raises(TENGraDError, match="'blk'.*10x damping"):
        woodbury.factor(torch.diag(torch.tensor([-100.0, 1.0], dtype=torch.float64)), m, a, "blk")


@pytest.mark.parametrize("fisher", ["mc", "exact"])
def test_step_without_opt_backward_points_to_it(fisher):
    model = make_model("tokens")
    opt = TENGraD(model, 0.1, 0.5, fisher=fisher, prior=None)
    x, y = make_batch("tokens", 4, "cross_entropy", torch.Generator().manual_seed(0))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(TENGraDError, match=r"opt\.backward"):
        opt.step()


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_backward_with_classes_last_names_the_fix(fisher):
    """An LM's logits [N, T, C] with labels [N, T]: cross_entropy wants the classes on dim 1, so
    opt.backward refuses them with the fix, before any backward (no gradient written); [N, C, T] runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 7))
    opt = TENGraD(model, 0.1, 0.5, fisher=fisher, prior=None)
    x, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 7, (4, 5))
    out = model(x)                                             # [4, 5, 7]
    with pytest.raises(TENGraDError, match=r"out \(4, 5, 7\) has them last .*out\.movedim\(-1, 1\)"):
        opt.backward(out, y)
    assert all(p.grad is None for p in model.parameters())
    loss = opt.backward(out.movedim(-1, 1), y)
    assert rel_err(loss, F.cross_entropy(out.movedim(-1, 1), y).detach()) < 1e-6
    opt.step()


# ---------------------------------------------------------------- state_dict resumes bit for bit
@pytest.mark.parametrize("path", ["auto", "reuse"])
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_state_dict_resumes_bit_for_bit(fisher, path):
    gen = torch.Generator().manual_seed(0)
    batches = [make_batch("tokens", m, "cross_entropy", gen) for m in (5, 4, 6, 3, 5, 2)]
    kw = dict(momentum=0.9, weight_decay=1e-2, update_freq=3, fisher=fisher, kl_clip=1e-2)
    if path == "reuse":
        kw["max_jacobian_numel"] = 0

    def run(model, opt, bs):
        for x, y in bs:
            out = model(x)
            opt.zero_grad()
            opt.backward(out, y, loss="cross_entropy")
            opt.step()

    base = make_model("tokens")
    straight = copy.deepcopy(base)
    run(straight, TENGraD(straight, 0.2, 0.3, generator=torch.Generator().manual_seed(5), **{"prior": None, "step_rule": "natural", **kw}), batches)

    first = copy.deepcopy(base)
    opt = TENGraD(first, 0.2, 0.3, generator=torch.Generator().manual_seed(5), **{"prior": None, "step_rule": "natural", **kw})
    run(first, opt, batches[:2])                       # stop mid-cycle: steps 3.. reuse the kept curvature
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = make_model("tokens", seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = TENGraD(resumed, 0.2, 0.3, generator=torch.Generator().manual_seed(99), **{"prior": None, "step_rule": "natural", **kw})
    opt2.load_state_dict(saved["opt"])
    run(resumed, opt2, batches[2:])
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


# ---------------------------------------------------------------- momentum, weight decay, kl_clip
def test_momentum_coupled_weight_decay_and_kl_clip_follow_their_formulas():
    lr, a, mu, wd, kl = 0.3, 0.5, 0.9, 0.05, 1e-4
    model = make_model("tokens")
    opt = TENGraD(model, lr, a, momentum=mu, weight_decay=wd, kl_clip=kl, update_freq=1, prior=None)
    gen = torch.Generator().manual_seed(0)
    buf = None
    nus = []
    for m in (5, 3):
        x, y = make_batch("tokens", m, "cross_entropy", gen)
        before = snapshot(model)
        g = {n: t.mean(0) + wd * before[n] for n, t in per_sample_grads(model, x, y, "cross_entropy").items()}
        Fd, names = oracle_fisher(model, x, y, "empirical", "cross_entropy")
        d = {n: v / -lr for n, v in expected_steps(opt, model, Fd, names, g, lr, a).items()}
        dg = sum(float((d[n] * g[n]).sum()) for n in names)
        nu = min(1.0, (kl / (lr * lr * dg)) ** 0.5)
        nus.append(nu)
        buf = {n: nu * d[n] if buf is None else mu * buf[n] + nu * d[n] for n in names}
        step_plain(model, opt, x, y)
        for n, p in model.named_parameters():
            assert rel_err(p.detach() - before[n], -lr * buf[n]) < 1e-8, n
    assert min(nus) < 1.0                                # the clip was active


# ---------------------------------------------------------------- per-layer path choice
class _Cost:
    def __init__(self, flops):
        self.flops = flops


class _Sized:
    def __init__(self, flops):
        self._flops = flops
        self.choice = {"gram": "direct", "jvp": "direct", "vjp": "direct"}

    def cost(self, quantity, order=None):
        if quantity not in self._flops:
            raise KeyError(quantity)
        return _Cost(self._flops[quantity])


class _Plan:
    def __init__(self, flops):
        self.flops = flops

    def sized(self, x_shape, gy_shape):
        return _Sized(self.flops)


def test_path_choice_uses_the_cost_model():
    cheap_products = _Plan({"gram": 1e3, "jvp": 1e2, "vjp": 1e2, "jacobian": 1e2})
    dear_products = _Plan({"gram": 1e6, "jvp": 1e8, "vjp": 1e8, "jacobian": 1e8})
    assert paths.choose(cheap_products, (8, 3), (8, 4), 100, 4, 2 ** 20).path == "reuse"
    assert paths.choose(dear_products, (8, 3), (8, 4), 100, 4, 2 ** 20).path == "jacobian"
    assert paths.choose(dear_products, (8, 3), (8, 4), 100, 4, 10).path == "reuse"   # memory cap
    with pytest.raises(TENGraDError, match="the cost model failed.*KeyError"):   # an error, not a reuse
        paths.choose(_Plan({"gram": 1e3}), (8, 3), (8, 4), 100, 4, 2 ** 20)


def test_explain_lists_each_layer_choice():
    model = make_model("tokens")
    opt = TENGraD(model, 0.1, 0.5, update_freq=2, prior=None)
    assert "undecided" in repr(opt) and opt.backend == "torch"      # "auto" is torch on CPU
    step_plain(model, opt, *make_batch("tokens", 4, "cross_entropy", torch.Generator().manual_seed(0)))
    text = opt.explain()
    for b in opt.blocks:
        assert f"block {b.name} " in text and "path=" in text
    assert repr(opt) == text
