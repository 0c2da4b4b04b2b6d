"""Checkpoints: a torch.save/torch.load round trip mid-run resumes bit for bit, and a load that does not
fit is refused whole, naming the first mismatch, with parameters, momentum buffers, kept curvature,
step count and group values bit-identical afterwards."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.snapshots import assert_unchanged, snapshot_all
from support.optim_cases import TokenNet, make_batch, make_model
from tengrad.optim import TENGraD, TENGraDError


def groups_of(model):
    return [{"params": list(model.emb.parameters()) + list(model.norm.parameters()), "lr": 0.1,
             "damping": 0.7, "weight_decay": 0.01},
            {"params": list(model.lin1.parameters()), "lr": 0.3, "damping": 0.2, "momentum": 0.5}]


def make_opt(model, **kw):
    args = dict(momentum=0.9, update_freq=3, param_groups=groups_of(model))
    args.update(kw)
    return TENGraD(model, 0.2, 0.5, **{"prior": None, "step_rule": "natural", **args})


def run(model, opt, batches, sched=None, fisher="empirical"):
    for x, y in batches:
        out = model(x)
        opt.zero_grad()
        if fisher == "empirical":
            F.cross_entropy(out, y).backward()
        else:
            opt.backward(out, y, loss="cross_entropy")
        opt.step()
        if sched is not None:
            sched.step()


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_save_load_mid_run_with_groups_and_a_scheduler_resumes_bit_for_bit(fisher):
    gen = torch.Generator().manual_seed(0)
    batches = [make_batch("tokens", m, "cross_entropy", gen) for m in (5, 4, 6, 3, 5, 2)]
    kw = dict(fisher=fisher, kl_clip=1e-2)

    def sched_for(opt):
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.2, 0.4, 0.3], total_steps=6)

    base = make_model("tokens")
    straight = copy.deepcopy(base)
    opt = make_opt(straight, generator=torch.Generator().manual_seed(5), **kw)
    run(straight, opt, batches, sched_for(opt), fisher)

    first = copy.deepcopy(base)
    opt1 = make_opt(first, generator=torch.Generator().manual_seed(5), **kw)
    sched1 = sched_for(opt1)
    run(first, opt1, batches[:2], sched1, fisher)          # stop mid-cycle (update_freq 3)
    saved = roundtrip({"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()})

    resumed = make_model("tokens", seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = make_opt(resumed, generator=torch.Generator().manual_seed(99), **kw)
    sched2 = sched_for(opt2)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2._steps == 2 and all(b.curv is not None for b in opt2.blocks)
    run(resumed, opt2, batches[2:], sched2, fisher)
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    for (p, s), (q, t) in zip(opt.state.items(), opt2.state.items()):
        assert torch.equal(s["momentum_buffer"], t["momentum_buffer"])



class _OpParams(nn.Module):
    """Parameters no module owns, read by ops with a spec: ``h * gate`` and ``torch.addmm(bias, h, weight)``;
    TENGraD makes them op-level blocks at its first step (curvature/block.py promote)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)
        self.gate = nn.Parameter(torch.randn(4))
        self.weight = nn.Parameter(torch.randn(4, 3))
        self.bias = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return torch.addmm(self.bias, torch.tanh(self.lin(x)) * self.gate, self.weight)


class _Joined(nn.Module):
    """A module's weight read with a free bias, ``F.linear(h, lin.weight, extra)``: the bias joins the
    module's block at the first step (promote's host)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.lin = nn.Linear(4, 3, bias=False)
        self.extra = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return F.linear(torch.tanh(self.inp(x)), self.lin.weight, self.extra)


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(5, 4), nn.Linear(4, 3)
        self.g1, self.g2 = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x)) * self.g1) * self.g2


class _TwoGammas(nn.Module):
    """Two layer-scale vectors of one submodule, ``h * self.body.g1`` and ``h * self.body.g2``: two op-level
    blocks that were both named after the module ("body"), so a checkpoint kept one of their curvatures."""

    def __init__(self):
        super().__init__()
        self.body = _Gated()

    def forward(self, x):
        return self.body(x)


def _op_opt(model):
    n = {_OpParams: 3, _Joined: 1, _TwoGammas: 2}[type(model)]
    with pytest.warns(UserWarning, match=f"no layer plan for {n} parameter"):   # blocks once an op reads them
        return TENGraD(model, 0.2, 0.5, update_freq=3, kl_clip=None, prior=None)


@pytest.mark.parametrize("net,blocks", [(_OpParams, {"lin", "gate", "weight+bias"}), (_Joined, {"inp", "lin"}),
                                        (_TwoGammas, {"body.lin1", "body.lin2", "body", "body.g1"})])
def test_a_checkpoint_of_op_level_blocks_resumes_bit_for_bit_in_a_fresh_optimizer(net, blocks):
    """A fresh optimizer has not seen the ops yet, so it had no block for the op-level blocks' kept
    curvature and refused the load ("the state_dict has curvature for layer 'gate', which this model
    lacks"; for a free bias joined to a module's block: "'jac' has shape (6, 18), expected (6, 15)"); the
    checkpoint now names them and the load builds them first."""
    torch.manual_seed(0)
    base = net()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 5, generator=gen), torch.randint(0, 3, (6,), generator=gen)) for _ in range(5)]
    straight = copy.deepcopy(base)
    opt = _op_opt(straight)
    run(straight, opt, batches[:3])
    after_3 = copy.deepcopy(straight)
    run(straight, opt, batches[3:])
    first = copy.deepcopy(base)
    opt1 = _op_opt(first)
    run(first, opt1, batches[:2])                            # mid-cycle: the next step reuses the kept curvature
    assert {b.name for b in opt1.blocks if b.curv is not None} == blocks
    assert not opt1.fallback
    saved = roundtrip({"model": first.state_dict(), "opt": opt1.state_dict()})
    resumed = net()
    resumed.load_state_dict(saved["model"])
    opt2 = _op_opt(resumed)
    assert opt2.fallback
    opt2.load_state_dict(saved["opt"])
    assert {b.name for b in opt2.blocks if b.curv is not None} == blocks and not opt2.fallback
    assert [b.param_names for b in opt2.blocks] == [b.param_names for b in opt1.blocks]
    run(resumed, opt2, batches[2:3])       # a reuse step: every block steps with the curvature it kept
    for (n, p), q in zip(after_3.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    run(resumed, opt2, batches[3:])        # a curvature step: the weight gradients from J where the saved run's
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):   # were (the shapes it kept)
        assert torch.equal(p, q), n


def test_an_in_memory_load_shares_no_buffer_with_the_saving_optimizer():
    """torch's load_state_dict keeps tensors whose dtype and device already match, so without a copy
    the loaded optimizer would share (and each step would advance twice) the saver's momentum
    buffers; both runs must instead continue exactly as an uninterrupted one."""
    gen = torch.Generator().manual_seed(1)
    batches = [make_batch("tokens", m, "cross_entropy", gen) for m in (5, 4, 6)]
    base = make_model("tokens")
    straight = copy.deepcopy(base)
    run(straight, make_opt(straight), batches)

    first = copy.deepcopy(base)
    opt1 = make_opt(first)
    run(first, opt1, batches[:1])
    second = copy.deepcopy(base)          # (a deepcopy of `first` would copy opt1's hooks too)
    second.load_state_dict(first.state_dict())
    opt2 = make_opt(second)
    opt2.load_state_dict(opt1.state_dict())
    for p, q in zip(first.parameters(), second.parameters()):
        assert opt1.state[p]["momentum_buffer"].data_ptr() != opt2.state[q]["momentum_buffer"].data_ptr()
    run(first, opt1, batches[1:])
    run(second, opt2, batches[1:])
    for (n, p), q, r in zip(straight.named_parameters(), first.parameters(), second.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r), n

# ---------------------------------------------------------------- refused loads change nothing
class WideTokenNet(TokenNet):
    """Same layer names as TokenNet, other widths (lin1: 6 -> 7, lin2: 7 -> 3)."""

    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(6, 7)
        self.lin2 = nn.Linear(7, 3)


@pytest.fixture(scope="module")
def saved():
    model = make_model("tokens")
    opt = make_opt(model)
    gen = torch.Generator().manual_seed(1)
    run(model, opt, [make_batch("tokens", m, "cross_entropy", gen) for m in (5, 4)])
    return opt.state_dict()


def target(model=None):
    """An optimizer with its own momentum buffers and kept curvature (one step taken)."""
    model = make_model("tokens", seed=7) if model is None else model
    opt = make_opt(model)
    run(model, opt, [make_batch("tokens", 4, "cross_entropy", torch.Generator().manual_seed(2))])
    return model, opt


def edit(path, value):
    def apply(sd):
        node = sd
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value(node[path[-1]]) if callable(value) else value
        return sd
    return apply


BAD_LOADS = {
    "not a state_dict": (lambda sd: [1, 2], r"expected an optimizer state_dict"),
    "group count": (lambda sd: dict(sd, param_groups=sd["param_groups"][:2]), r"2 param group\(s\), this optimizer 3"),
    "group size": (edit(("param_groups", 1, "params"), lambda ps: ps[:1]), r"param_groups\[1\] has 1 parameters"),
    "missing damping": (edit(("param_groups", 0, "damping"), KeyError), r"param_groups\[0\] has no 'damping'"),
    "nan lr": (edit(("param_groups", 2, "lr"), float("nan")), r"param_groups\[2\]\['lr'\] must be"),
    "momentum 1.5": (edit(("param_groups", 1, "momentum"), 1.5), r"param_groups\[1\]\['momentum'\]"),
    "no tengrad entry": (edit(("tengrad",), KeyError), r"no 'tengrad' entry"),
    "negative steps": (edit(("tengrad", "steps"), -1), r"'steps' must be an integer >= 0, got -1"),
    "fractional steps": (edit(("tengrad", "steps"), 2.5), r"'steps' must be an integer >= 0, got 2.5"),
    "renamed parameter": (edit(("tengrad", "param_names", 3), "x.weight"), r"parameter 3 is 'x\.weight'"),
    "param shape": (edit(("tengrad", "param_shapes", 3), [9, 9]), r"parameter 3 \('lin1\.weight'\) has shape \(9, 9\)"),
    "buffer shape": (edit(("state", 0, "momentum_buffer"), lambda t: t[:-1]), r"state of parameter 'emb\.weight'.*shape"),
    "foreign state key": (edit(("state", 0, "exp_avg_sq"), torch.zeros(1)), r"unexpected key 'exp_avg_sq'"),
    "unknown block": (lambda sd: edit(("tengrad", "blocks", "head"), sd["tengrad"]["blocks"]["lin2"])(sd),
                      r"curvature for layer 'head', which this model lacks"),
    "path kind": (edit(("tengrad", "blocks", "lin1", "path"), "magic"), r"block 'lin1': unknown path kind 'magic'"),
    "gram shape": (edit(("tengrad", "blocks", "lin1", "gram"), lambda t: t[:, :-1]), r"block 'lin1': 'gram' has shape"),
    "chol shape": (edit(("tengrad", "blocks", "norm", "chol"), lambda t: t[:-1, :-1]), r"block 'norm': 'chol' has shape"),
    "m": (edit(("tengrad", "blocks", "norm", "m"), 0), r"block 'norm': 'm' must be a positive integer"),
    "damping": (edit(("tengrad", "blocks", "norm", "damping"), float("inf")), r"block 'norm': 'damping' must be"),
    "choice": (edit(("tengrad", "blocks", "norm", "choice"), "reuse"), r"block 'norm': 'choice' must be"),
    "noise scale s": (edit(("tengrad", "noise", "s"), 2.0), r"'noise' \(the gradient-noise scale.*'s' must be a number in"),
    "noise keys": (edit(("tengrad", "noise"), {"s": 0.5}), r"'noise' \(the gradient-noise scale.*must be a dict with keys"),
    "curvature dtype": (edit(("tengrad", "blocks", "lin1", "gram"), lambda t: t.float()), r"block 'lin1': curvature in torch.float32"),
    "jacobian_grad shape": (edit(("tengrad", "jacobian_grad"), {"lin1": [4, -1]}), r"'jacobian_grad' must map block names"),
}


@pytest.mark.parametrize("case", list(BAD_LOADS))
def test_a_bad_state_dict_is_refused_whole_naming_the_first_mismatch(saved, case):
    mutate, needle = BAD_LOADS[case]
    model, opt = target()
    snap = snapshot_all(model, opt)
    with pytest.raises(TENGraDError, match=needle) as info:
        opt.load_state_dict(mutate(copy.deepcopy(saved)))
    assert "load_state_dict" in str(info.value) and "unchanged" in str(info.value)
    assert_unchanged(model, opt, snap)


def test_kept_input_that_does_not_fit_the_layer_is_refused_naming_the_block():
    model = make_model("tokens")
    opt = make_opt(model, max_jacobian_numel=0)             # every block keeps x/gy (reuse path)
    run(model, opt, [make_batch("tokens", 5, "cross_entropy", torch.Generator().manual_seed(1))])
    sd = copy.deepcopy(opt.state_dict())
    assert sd["tengrad"]["blocks"]["lin1"]["path"] == "reuse"
    sd["tengrad"]["blocks"]["lin1"]["x"] = sd["tengrad"]["blocks"]["lin1"]["x"][..., :-1].contiguous()
    model, opt = target()
    snap = snapshot_all(model, opt)
    with pytest.raises(TENGraDError, match=r"block 'lin1' does not fit this model's layer 'lin1'"):
        opt.load_state_dict(sd)
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("keep_names", [True, False])
def test_same_layer_names_other_widths_is_refused(saved, keep_names):
    sd = copy.deepcopy(saved)
    if not keep_names:      # an older state_dict without names/shapes: buffers and curvature catch it
        del sd["tengrad"]["param_names"], sd["tengrad"]["param_shapes"]
    model, opt = target(WideTokenNet().double())
    snap = snapshot_all(model, opt)
    with pytest.raises(TENGraDError, match=r"lin1") as info:
        opt.load_state_dict(sd)
    assert "shape" in str(info.value)
    assert_unchanged(model, opt, snap)


def test_an_sgd_state_dict_is_refused_before_step():
    model = make_model("tokens", seed=7)
    opt = make_opt(model, param_groups=None)                 # one group, like the SGD state_dict
    run(model, opt, [make_batch("tokens", 4, "cross_entropy", torch.Generator().manual_seed(2))])
    sgd_model = make_model("tokens")
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9)
    x, y = make_batch("tokens", 4, "cross_entropy", torch.Generator().manual_seed(0))
    F.cross_entropy(sgd_model(x), y).backward()
    sgd.step()
    snap = snapshot_all(model, opt)
    with pytest.raises(TENGraDError, match=r"param_groups\[0\] has no 'damping'.*TENGraD state_dict"):
        opt.load_state_dict(sgd.state_dict())
    assert_unchanged(model, opt, snap)


def test_a_good_load_replaces_curvature_and_forgets_blocks_the_checkpoint_lacks(saved):
    sd = copy.deepcopy(saved)
    del sd["tengrad"]["blocks"]["lin2"]
    model, opt = target()
    opt.load_state_dict(sd)
    by = {b.name: b for b in opt.blocks}
    assert by["lin2"].curv is None and by["lin1"].curv is not None
    assert torch.equal(by["lin1"].curv.gram, saved["tengrad"]["blocks"]["lin1"]["gram"])
    assert opt._steps == saved["tengrad"]["steps"]
