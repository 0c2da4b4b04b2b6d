"""Training loops people write, one step each against the dense float64 per-block oracle
-(F_b + a I)^-1 g_b (rows of F: per-sample gradients from torch.func), or a named error.

Covered here: extra autograd passes before the real backward (a logged gradient norm, a saliency map,
``backward(inputs=[x])``): only the backward that accumulates into ``.grad`` is recorded; the batch
read from a keyword argument (``model(ids=...)``) and declared ``batch_dim`` entries checked against m.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.numerics import rel_err
from support.step_oracle import expected_steps, fisher_from_grads, per_sample_grads
from tengrad.optim import TENGraD, TENGraDError
from tengrad.optim.curvature.consistency import BatchDimensionError, UnexplainedGradientError

TOL = 1e-8


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(m=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (m,), generator=gen)


def _opt(model, **kw):
    return TENGraD(model, lr=0.2, damping=0.5, momentum=0.0, kl_clip=None, update_freq=kw.pop("k", 1),
                   check=True, **{"prior": None, "step_rule": "natural", **kw})


EXTRA = {
    "grad norm w.r.t. the parameters": lambda loss, model, x: torch.autograd.grad(
        loss, list(model.parameters()), retain_graph=True),
    "saliency w.r.t. the input": lambda loss, model, x: torch.autograd.grad(loss, x, retain_graph=True),
    "backward(inputs=[x])": lambda loss, model, x: loss.backward(inputs=[x], retain_graph=True),
    "create_graph grad w.r.t. the parameters": lambda loss, model, x: torch.autograd.grad(
        loss, list(model.parameters()), retain_graph=True, create_graph=True),
}


@pytest.mark.parametrize("extra", list(EXTRA))
@pytest.mark.parametrize("k", [1, 3])
def test_an_extra_autograd_pass_before_backward_leaves_the_step_exact(extra, k):
    """A pass differentiating w.r.t. the parameters needs them in the graph: on curvature steps the
    gradient from the Jacobian detaches them (grad_from_jacobian=False keeps them). ``backward(inputs=
    [x])`` is told apart only where some captured call's parameters are in the graph: in this MLP every
    block keeps an explicit J, so with the gradient from the Jacobian no parameter is (a stated limit)."""
    model = _mlp()
    opt = _opt(model, k=k, grad_from_jacobian="parameters" not in extra and "inputs" not in extra)
    kept: dict = {}
    for step in range(k + 1):         # curvature steps (and reuse steps after them) all exact
        x, y = _batch(seed=step)
        x.requires_grad_(True)

        def loop():
            loss = F.cross_entropy(model(x), y)
            EXTRA[extra](loss, model, x)
            if x.grad is not None:
                x.grad = None
            loss.backward()

        _check_step(opt, model, x.detach(), y, loop, kept)


def test_an_extra_pass_after_backward_is_not_recorded_either():
    model = _mlp()
    opt = _opt(model, grad_from_jacobian=False)
    x, y = _batch()

    def loop():
        loss = F.cross_entropy(model(x), y)
        loss.backward(retain_graph=True)
        torch.autograd.grad(loss, list(model.parameters()))

    _check_step(opt, model, x, y, loop, {})


class _Keywords(nn.Module):
    """Called as Hugging Face models are: model(ids=..., mask=...); its Linear sees [T, N, d]."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 5)
        self.mix = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, ids=None, scale=None):
        h = self.emb(ids).transpose(0, 1)                      # [T, N, 5]: sample on dim 1
        h = torch.tanh(self.mix(h)) * scale
        return self.head(h.mean(0))


def test_batch_read_from_a_keyword_argument_and_declared_dims_are_exact():
    torch.manual_seed(0)
    model = _Keywords().double()
    # T = 6 != N = 4: the sequence-first Linear would be ambiguous without the declaration only if T == N;
    # declared here to check that a declared dim is used (and checked) for a use
    opt = TENGraD(model, lr=0.2, damping=0.5, momentum=0.0, kl_clip=None, update_freq=1, check=True,
                  batch_dim={"": 0, "mix": 1}, prior=None)
    gen = torch.Generator().manual_seed(3)
    ids, y = torch.randint(0, 9, (4, 6), generator=gen), torch.randint(0, 3, (4,), generator=gen)
    scale = torch.tensor(1.5, dtype=torch.float64)

    class Call(nn.Module):       # the oracle's view: the same function of (ids) with keywords
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(ids=ids, scale=scale)

    lr, damping = 0.2, 0.5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = Call(model)
    rows = per_sample_grads(wrapped, ids, y, "cross_entropy")
    names = [n for n, p in wrapped.named_parameters()]
    g = {n.removeprefix("inner."): t.mean(0) for n, t in rows.items()}
    F_dense = fisher_from_grads(rows, names)
    exact = expected_steps(opt, model, F_dense, [n.removeprefix("inner.") for n in names], g, lr, damping)
    opt.zero_grad()
    F.cross_entropy(model(ids=ids, scale=scale), y).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert rel_err(p.detach() - before[n], exact[n]) <= TOL, n


def test_a_declared_batch_dim_that_is_not_the_batch_raises_naming_the_layer_and_the_fix():
    torch.manual_seed(0)
    model = _Keywords().double()
    opt = TENGraD(model, update_freq=1, batch_dim={"": 0, "mix": 0}, prior=None)    # dim 0 of [T, N, 5] is T
    ids, y = torch.randint(0, 9, (4, 6)), torch.randint(0, 3, (4,))
    scale = torch.tensor(1.0, dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(ids=ids, scale=scale), y).backward()
    with pytest.raises(BatchDimensionError, match=r"'mix'.*dim 0.*its dim 1 has that size: batch_dim=\{\.\.\., 'mix': 1\}"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(b.curv is None for b in opt.blocks) and opt._steps == 0


# ---------------------------------------------------------------- the trainable set follows requires_grad
def _deep():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("k", [1, 3])
def test_a_layer_frozen_after_construction_never_moves_and_the_rest_is_exact(k):
    model = _deep()
    opt = _opt(model, k=k)
    kept: dict = {}
    for step in range(2 * k + 1):
        if step == 1:
            model[4].requires_grad_(False)           # fine-tuning: freeze the head after building
            kept.pop("4", None)
        x, y = _batch(seed=step)
        head = [p.detach().clone() for p in model[4].parameters()]

        def loop():
            F.cross_entropy(model(x), y).backward()

        _check_step(opt, model, x, y, loop, kept)
        if step >= 1:
            assert all(torch.equal(a, p) for a, p in zip(head, model[4].parameters())), "a frozen head moved"
            assert all(p.grad is None for p in model[4].parameters())
    assert "skipped at the last step: frozen" in opt.explain()


def _check_step(opt, model, x, y, loop, kept, gradient=None):
    """``loop()`` runs the training loop's passes (leaving .grad); then one step, each block against
    -lr (F_b + a I)^-1 g_b with F_b from that block's last refresh (``kept``: {block name: F_b},
    updated for the blocks due at this step: curvature steps, and a block whose trainable set changed);
    g the mean of the per-sample gradients, or ``gradient(twin)`` ({name: g} on a float64 twin)."""
    lr, damping = opt.param_groups[0]["lr"], opt.param_groups[0]["damping"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = per_sample_grads(model, x, y, "cross_entropy")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    g = {n: t.mean(0) for n, t in rows.items() if n in names}
    if gradient is not None:
        g = {n: t for n, t in gradient(copy.deepcopy(model)).items() if n in names}
    F_now = fisher_from_grads({n: rows[n] for n in names}, names)
    opt.zero_grad()
    due = {b.name for b in opt.blocks if opt.estimator.due(b, opt._steps, opt.update_freq)}
    offsets, start = {}, 0
    for n in names:
        size = rows[n][0].numel()
        offsets[n], start = torch.arange(start, start + size), start + size
    for b in opt.blocks:                                 # per block: its Fisher from its last refresh
        if b.param_names and (b.name in due or b.name not in kept):
            idx = torch.cat([offsets[n] for n in b.param_names])
            kept[b.name] = F_now[idx][:, idx]
    loop()
    opt.step()
    for b in opt.blocks:
        if not b.param_names:
            continue
        gb = torch.cat([g[n].reshape(-1) for n in b.param_names])
        d = torch.linalg.solve(kept[b.name] + damping * torch.eye(len(gb), dtype=gb.dtype), gb)
        moved = torch.cat([(dict(model.named_parameters())[n].detach() - before[n]).reshape(-1)
                           for n in b.param_names])
        assert rel_err(moved, -lr * d) <= TOL, b.name


@pytest.mark.parametrize("k", [1, 3])
def test_a_layer_unfrozen_later_joins_at_its_next_curvature_step_exactly(k):
    model = _deep()
    model[0].requires_grad_(False)                   # gradual unfreezing: the first layer starts frozen
    opt = _opt(model, k=k)
    assert [b.param_names for b in opt.blocks if b.name == "0"] == [[]]
    kept: dict = {}
    first = [p.detach().clone() for p in model[0].parameters()]
    for step in range(2 * k + 1):
        if step == 2:
            model[0].requires_grad_(True)
        x, y = _batch(seed=step)
        _check_step(opt, model, x, y, lambda: F.cross_entropy(model(x), y).backward(), kept)
        moved = not all(torch.equal(a, p) for a, p in zip(first, model[0].parameters()))
        assert moved == (step >= 2), step
    assert [b.param_names for b in opt.blocks if b.name == "0"] == [["0.weight", "0.bias"]]


def test_a_parameter_replaced_after_construction_is_refused_naming_it():
    model = _deep()
    opt = _opt(model)
    x, y = _batch()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    model[2].weight = nn.Parameter(torch.randn(5, 6, dtype=torch.float64))
    with pytest.raises(Exception, match=r"'2\.weight'.*in no param group.*added or replaced"):
        opt.zero_grad()


# ---------------------------------------------------------------- gradient accumulation
def _union_step_check(opt, model, batches, weights, kept):
    """k micro-batches, loss_j * weight_j backpropagated each, one step: against the union batch's
    oracle (F from all samples; g = the accumulated gradient, which is the union mean here)."""
    lr, damping = opt.param_groups[0]["lr"], opt.param_groups[0]["damping"]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rows = per_sample_grads(model, x, y, "cross_entropy")
    if opt._steps % opt.update_freq == 0:
        kept["F"] = fisher_from_grads(rows, names)
    g = {n: t.mean(0) for n, t in rows.items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    exact = expected_steps(opt, model, kept["F"], names, g, lr, damping)
    opt.zero_grad()
    for (xb, yb), w in zip(batches, weights):
        (F.cross_entropy(model(xb), yb) * w).backward()
    for n, p in model.named_parameters():
        assert rel_err(p.grad, g[n]) <= 1e-12, n           # the loop's gradient is the union mean
    opt.step()
    for n, p in model.named_parameters():
        assert rel_err(p.detach() - before[n], exact[n]) <= TOL, n


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("sizes", [[4, 4], [3, 3, 3, 3], [5, 2], [2, 4, 1, 3]],
                         ids=["2 equal", "4 equal", "2 uneven", "4 uneven"])
def test_gradient_accumulation_gives_the_union_batch_step(sizes, k):
    """Equal micro-batches with the common loss / n_micro; uneven ones weighted m_j / M (so that the
    accumulated gradient is the union batch's mean)."""
    model = _deep()
    opt = _opt(model, k=k)
    kept: dict = {}
    M = sum(sizes)
    equal = len(set(sizes)) == 1
    weights = [1.0 / len(sizes)] * len(sizes) if equal else [m / M for m in sizes]
    for step in range(k + 1):
        gen = torch.Generator().manual_seed(10 + step)
        batches = [(torch.randn(m, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (m,), generator=gen))
                   for m in sizes]
        _union_step_check(opt, model, batches, weights, kept)
    assert all(b.curv.m == M for b in opt.blocks)


def test_accumulation_through_a_shared_block_is_the_union_step():
    """A weight read by two calls in each of two forwards (the summed-J path)."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.inp(torch.tanh(self.inp(x)))))

    torch.manual_seed(0)
    model = Twice().double()
    opt = _opt(model)
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(m, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (m,), generator=gen))
               for m in (3, 5)]
    _union_step_check(opt, model, batches, [3 / 8, 5 / 8], {})
    assert len(next(b for b in opt.blocks if b.name == "inp").uses) == 4


# ---------------------------------------------------------------- loss scaling
def _scaled_step(opt, model, x, y, kept, scale_and_step):
    """One step whose loop scales the loss (``scale_and_step(loss)`` backpropagates and steps), against
    the oracle of the unscaled loss (per-block Fisher from each block's last refresh)."""
    lr, damping = opt.param_groups[0]["lr"], opt.param_groups[0]["damping"]
    twin = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    m64 = copy.deepcopy(model).double()
    rows = per_sample_grads(m64, x.double(), y, "cross_entropy")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    g = {n: t.mean(0) for n, t in rows.items()}
    F_now = fisher_from_grads(rows, names)
    if opt._steps % opt.update_freq == 0:
        kept["F"] = F_now
    exact = expected_steps(opt, m64, kept["F"], names, g, lr, damping)
    opt.zero_grad()
    scale_and_step(F.cross_entropy(model(x), y))
    return {n: rel_err(p.detach().double() - twin[n], exact[n]) for n, p in model.named_parameters()}


@pytest.mark.parametrize("k", [1, 3])
def test_grad_scaler_steps_are_the_unscaled_step_and_an_inf_step_is_skipped(k):
    model = _deep().float()
    opt = _opt(model, k=k)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    kept: dict = {}

    def amp(loss):
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for step in range(2 * k + 1):
        x, y = _batch(seed=step)
        if step == 1:                                      # an overflow: GradScaler skips the step
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            curv = [b.curv for b in opt.blocks]
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x.float()), y)).backward()
            model[0].weight.grad.view(-1)[0] = float("inf")
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            assert scaler.get_scale() < scale and opt._steps == 1
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
            assert all(b.curv is c for b, c in zip(opt.blocks, curv))
            continue
        errs = _scaled_step(opt, model, x.float(), y, kept, amp)
        assert max(errs.values()) <= 1e-4, errs
        assert opt.estimator.last_loss_scale in (1.0, scaler.get_scale()) or opt._steps % k != 1


def test_a_manual_power_of_two_loss_scale_is_exact_and_clipping_keeps_the_unclipped_fisher():
    model = _deep()
    opt = _opt(model)
    kept: dict = {}

    def manual(loss):
        (loss * 1024.0).backward()
        for p in model.parameters():
            p.grad /= 1024.0
        opt.step()

    errs = _scaled_step(opt, model, *_batch(seed=3), kept, manual)
    assert max(errs.values()) <= TOL, errs
    assert opt.estimator.last_loss_scale == 1024.0
    # clipping after backward: the step preconditions the clipped gradient with the unclipped Fisher
    x, y = _batch(seed=4)
    lr, damping = 0.2, 0.5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = per_sample_grads(model, x, y, "cross_entropy")
    names = [n for n, _ in model.named_parameters()]
    g = {n: t.mean(0) for n, t in rows.items()}
    norm = torch.sqrt(sum((t ** 2).sum() for t in g.values()))
    c = float(0.1 / (norm + 1e-6))                         # clip_grad_norm_: max_norm / (norm + 1e-6)
    exact = expected_steps(opt, model, fisher_from_grads(rows, names), names, {n: c * t for n, t in g.items()},
                           lr, damping)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    opt.step()
    assert c < 1 and opt.estimator.last_loss_scale == 1.0
    for n, p in model.named_parameters():
        assert rel_err(p.detach() - before[n], exact[n]) <= TOL, n


# ---------------------------------------------------------------- gradient penalties
def _penalised(model, x, y, gamma=0.5):
    """CE + gamma ||d CE / d x||^2 (an input-gradient penalty, R1-style), built with create_graph."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    gx, = torch.autograd.grad(loss, x, create_graph=True)
    return loss + gamma * gx.pow(2).sum()


@pytest.mark.parametrize("grad_from_jacobian", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_a_lazy_gradient_penalty_is_refused_on_curvature_steps_and_exact_on_reuse_steps(k, grad_from_jacobian):
    """At the default check (per step: K 1 / m against R g for every fresh block, and the loss-scale
    block's J^T 1 / m against param.grad) a step whose gradient has a penalty the per-sample rows do not
    explain is refused on every curvature step, with nothing changed; on reuse steps the kept Fisher
    preconditions the whole gradient, penalty included (the oracle's g). With the gradient from the
    Jacobian the create_graph pass itself is what names it (the detached weights would lose its terms)."""
    model = _deep()
    opt = TENGraD(model, lr=0.2, damping=0.5, momentum=0.0, kl_clip=None, update_freq=k,
                  grad_from_jacobian=grad_from_jacobian, prior=None)
    kept: dict = {}
    refused = 0
    for step in range(2 * k + 2):
        x, y = _batch(seed=step)
        penalty = step % 2 == 1                              # lazy regularisation: every other step
        if penalty and opt._steps % k == 0:                  # a curvature step: refused, nothing changed
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            curv = [b.curv for b in opt.blocks]
            opt.zero_grad()
            _penalised(model, x, y).backward()
            with pytest.raises(UnexplainedGradientError, match="create_graph" if grad_from_jacobian else "explain"):
                opt.step()
            assert opt._steps == step                        # each iteration steps once in the end
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
            assert all(b.curv is c for b, c in zip(opt.blocks, curv))
            refused += 1
            penalty = False                                  # the user drops the penalty on this step
        if penalty:
            def loop():
                _penalised(model, x, y).backward()

            def total(twin):
                _penalised(twin, x, y).backward()
                return {n: p.grad for n, p in twin.named_parameters()}

            _check_step(opt, model, x, y, loop, kept, gradient=total)
        else:
            _check_step(opt, model, x, y, loop=lambda: F.cross_entropy(model(x), y).backward(), kept=kept)
    assert refused == (2 if k == 1 else 1)


class _FreeBias(nn.Module):
    """``F.linear(h, lin.weight, free_bias)``: the free bias joins lin's block at the first step."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5).double()
        self.lin = nn.Linear(5, 3, bias=False).double()
        self.free_bias = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def forward(self, x):
        return F.linear(torch.tanh(self.inp(x)), self.lin.weight, self.free_bias)


def test_a_joined_free_parameter_frozen_and_unfrozen_leaves_and_rejoins_its_block_exactly():
    """The block re-read only its module's own parameters, so a frozen free bias stayed in lin's block
    (its Fisher then coupled lin.weight's step to a parameter that does not train) and an unfrozen one
    was not seen; every step here is the dense per-block oracle's."""
    torch.manual_seed(0)
    model = _FreeBias()
    with pytest.warns(UserWarning, match="no layer plan for 1 parameter"):
        opt = _opt(model, k=2)
    for step in range(2):          # the free bias joins lin's block at the first step (the oracle starts after)
        x, y = _batch(seed=step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    kept: dict = {}
    for step in range(2, 8):
        if step == 2:
            model.free_bias.requires_grad_(False)
        if step == 4:
            model.free_bias.requires_grad_(True)
        x, y = _batch(seed=step)
        _check_step(opt, model, x, y, loop=lambda: F.cross_entropy(model(x), y).backward(), kept=kept)
        lin = next(b for b in opt.blocks if b.name == "lin")
        assert lin.param_names == (["lin.weight"] if step in (2, 3) else ["lin.weight", "free_bias"]), (step, lin.param_names)


def test_a_gradient_penalty_on_the_first_step_is_named_as_one():
    """The first curvature step also runs the full check (verify, one J^T 1 per block), which named the
    mismatch a penalty makes as a wrong spec (SpecMismatchError: tied head, batch dimension, transposed
    weight); the capture now records that a create_graph pass reached the layer, and the error says so."""
    model = _deep()
    opt = TENGraD(model, lr=0.2, damping=0.5, kl_clip=None, grad_from_jacobian=False, prior=None)
    x, y = _batch(seed=0)
    opt.zero_grad()
    _penalised(model, x, y).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UnexplainedGradientError, match="create_graph=True\\) pass reached its output"):
        opt.step()
    assert opt._steps == 0 and all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------- loss conventions
def _convention_step(opt, model, x, y, run, counted, reduction):
    """One curvature step of ``run()`` against -lr (F + a I)^-1 g per block, where F and g are those of
    the loss as written (curvature/conventions.py): over the counted samples (rows = per-sample
    gradients of their losses), F their mean (reduction "mean") or sum ("sum"), g likewise."""
    lr, damping = opt.param_groups[0]["lr"], opt.param_groups[0]["damping"]
    names = [n for n, _ in model.named_parameters()]
    rows = per_sample_grads(model, x[counted], y[counted], "cross_entropy")
    n_eff = int(counted.sum())
    F_true = fisher_from_grads(rows, names) * (n_eff if reduction == "sum" else 1)
    g = {n: t.mean(0) * (n_eff if reduction == "sum" else 1) for n, t in rows.items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    exact = expected_steps(opt, model, F_true, names, g, lr, damping)
    opt.zero_grad()
    run()
    for n, p in model.named_parameters():
        assert rel_err(p.grad, g[n]) <= 1e-12, n
    opt.step()
    return {n: rel_err(p.detach() - before[n], exact[n]) for n, p in model.named_parameters()}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignored", [0, 3])
def test_opt_backward_with_ignore_index_and_reduction_gives_the_fisher_of_the_loss_as_written(ignored, reduction):
    model = _deep()
    opt = _opt(model)
    x, y = _batch(m=8, seed=7)
    y[:ignored] = -100                                   # cross_entropy's default ignore_index
    counted = y != -100
    errs = _convention_step(opt, model, x, y, lambda: opt.backward(model(x), y, reduction=reduction),
                            counted, reduction)
    assert max(errs.values()) <= TOL, errs


def test_a_plain_backward_with_ignored_samples_or_a_sum_gives_the_stated_step():
    """README: a plain loss.backward() reads the loss as a mean over all m samples: ignored samples
    scale F by m / m_eff, a sum by m^2 (curvature/conventions.py docstring), against the oracle."""
    for reduction, ignored in (("mean", 3), ("sum", 0)):
        model = _deep()
        opt = _opt(model)
        lr, damping = opt.param_groups[0]["lr"], opt.param_groups[0]["damping"]
        x, y = _batch(m=8, seed=8)
        y[:ignored] = 5
        counted = y != 5
        m, n_eff = 8, int(counted.sum())
        names = [n for n, _ in model.named_parameters()]
        rows = per_sample_grads(model, x[counted], y[counted], "cross_entropy")
        F_eff = fisher_from_grads(rows, names)
        if reduction == "mean":
            F_stated, g = F_eff * (m / n_eff), {n: t.mean(0) for n, t in rows.items()}
        else:
            F_stated, g = F_eff * m * m, {n: t.sum(0) for n, t in rows.items()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        exact = expected_steps(opt, model, F_stated, names, g, lr, damping)
        opt.zero_grad()
        F.cross_entropy(model(x), y, ignore_index=5, reduction=reduction).backward()
        opt.step()
        for n, p in model.named_parameters():
            assert rel_err(p.detach() - before[n], exact[n]) <= TOL, (reduction, n)


def test_ignored_labels_are_refused_where_the_fisher_cannot_follow_them():
    model = _deep()
    x, y = _batch(m=8, seed=9)
    y[:2] = -100
    opt = TENGraD(model, lr=0.2, damping=0.5, fisher="mc", prior=None)
    with pytest.raises(TENGraDError, match="fisher='empirical'"):
        opt.backward(model(x), y)
    opt = _opt(model)
    opt.backward(model(x[:4]), y[:4])
    with pytest.raises(TENGraDError, match="one opt.backward per step"):
        opt.backward(model(x[4:]), y[4:])
    y[:] = -100
    opt.zero_grad()
    with pytest.raises(TENGraDError, match="only ignored labels"):
        opt.backward(model(x), y)


class _GatedNet(nn.Module):
    """A Linear block, a GRU (no spec: its parameters are fallback parameters, d = g / a) and a gate read by
    ``h * w`` (an op-level block, capture/ops.py)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, dtype=torch.float64))
        self.gru = nn.GRU(4, 5, batch_first=True).double()
        self.head = nn.Linear(5, 3).double()

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1] * self.w)


@pytest.mark.parametrize("rule", ["natural", "adam"])
@pytest.mark.parametrize("which", ["w", "gru.weight_ih_l0"])
def test_a_parameter_frozen_between_backward_and_step_does_not_move(which, rule):
    """``requires_grad_(False)`` after the backward leaves the gradient in ``.grad``; the step reads
    ``requires_grad`` (options.py: a frozen parameter never moves), also for a fallback parameter and an
    op-level block's, which once stepped as g / a on that step. The other parameters move, and the frozen
    one stays put on the steps after it."""
    torch.manual_seed(0)
    model = _GatedNet()
    kw = dict(prior="soap", step_rule="adam", kl_clip=None) if rule == "adam" else dict(kl_clip=None)
    with pytest.warns(UserWarning, match="no layer plan for 5 parameter"):     # w and the GRU's: fallback
        opt = TENGraD(model, lr=0.01 if rule == "adam" else 0.2, damping=0.5, update_freq=2, **{"prior": None, "step_rule": "natural", **kw})
    frozen = dict(model.named_parameters())[which]
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        x, y = torch.randn(8, 3, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if step == 1:
            frozen.requires_grad_(False)
            assert frozen.grad is not None
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
        assert (which in moved) == (step == 0), (step, moved)
        assert {"head.weight", "gru.weight_hh_l0"} <= moved, (step, moved)


def _bias_before_batchnorm():
    """conv (weight frozen: its block is the bias alone, the smallest) -> BatchNorm2d -> ... : BatchNorm in
    training mode cancels any per-channel shift, so the conv bias's gradient is 0 up to rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten(),
                          nn.Linear(5, 3)).double()
    model[0].weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("check", [True, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_bias_whose_gradient_cancels_passes_the_checks_and_leaves_the_loss_scale_to_the_next_block(dtype, check):
    """Its param.grad is rounding noise: the consistency checks (verify, the per-step screen and the
    loss-scale block's check) once compared its direction and raised SpecMismatchError; and the loss scale,
    read from the smallest block, came from that noise. Now such a block is skipped by the checks
    (consistency.cancelled) and the next block tells the scale: a loss multiplied by 2^6 before backward and
    the gradients divided after it step bit for bit as the plain loss."""
    runs = []
    for factor in (1.0, 64.0):
        model = _bias_before_batchnorm().to(dtype)
        opt = TENGraD(model, lr=0.1, damping=0.5, kl_clip=None, update_freq=2, check=check, prior=None)
        gen = torch.Generator().manual_seed(2)
        for step in range(5):
            x = torch.randn(8, 3, 5, 5, generator=gen, dtype=torch.float64).to(dtype)
            y = torch.randint(0, 3, (8,), generator=gen)
            opt.zero_grad()
            (F.cross_entropy(model(x), y) * factor).backward()
            for p in model.parameters():
                if p.grad is not None:
                    p.grad /= factor
            opt.step()
        assert opt.estimator.last_loss_scale == factor, (factor, opt.estimator.last_loss_scale)
        runs.append([p.detach().clone() for p in model.parameters()])
    bias_grad = model[0].bias.grad.norm() / model[3].bias.grad.norm()
    assert bias_grad < 1e-5, bias_grad       # the cancelled gradient this test is about
    for a, b in zip(*runs):
        assert torch.equal(a, b)
