"""A battery of bad inputs: each is refused with a TengradError whose message names the offending
argument, layer or index, and leaves parameters, momentum buffers and kept curvature bit-identical.

Covers the optimizer's hyperparameters (construction and every step, through ``param_groups`` too),
a non-module first argument, blocks unused in a forward, the compiled plans' argument checks
(checks.py) and the command line's one-line errors."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tengrad
from support.snapshots import assert_unchanged, snapshot_all
from support.optim_cases import make_batch, make_model
from tengrad import ShapeError, TengradError
from tengrad.cli import main as cli
from tengrad.optim import TENGraD, TENGraDError

NAN, INF = float("nan"), float("inf")


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def step_plain(model, opt, x, y, set_to_none=True):
    opt.zero_grad(set_to_none=set_to_none)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def trained(**kw):
    """A tokens model and its optimizer after one step (momentum buffers and curvature exist)."""
    model = make_model("tokens")
    args = dict(momentum=0.9, update_freq=2)
    args.update(kw)
    opt = TENGraD(model, 0.2, 0.5, **args)
    step_plain(model, opt, *make_batch("tokens", 5, "cross_entropy", torch.Generator().manual_seed(0)))
    return model, opt


def no_hooks(model) -> bool:
    return all(not m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------- construction
CONSTRUCT = [
    (dict(lr=NAN), r"^lr must be a finite number >= 0, got nan"),
    (dict(lr=INF), r"^lr must be .*got inf"),
    (dict(lr=-1), r"^lr must be .*got -1"),
    (dict(lr="0.1"), r"^lr must be .*got '0\.1' \(str\)"),
    (dict(lr=True), r"^lr must be .*got True \(bool\)"),
    (dict(lr=torch.tensor(0.1)), r"^lr must be .*\(Tensor\)"),
    (dict(damping=NAN), r"^damping must be a finite number > 0, got nan"),
    (dict(damping=INF), r"^damping must be .*got inf"),
    (dict(damping=0), r"^damping must be .*got 0"),
    (dict(damping=-1.0), r"^damping must be .*got -1\.0"),
    (dict(momentum=-0.5), r"^momentum must be a finite number in \[0, 1\), got -0\.5"),
    (dict(momentum=1.5), r"^momentum must be .*got 1\.5"),
    (dict(momentum=1.0), r"^momentum must be .*got 1\.0"),
    (dict(weight_decay=-1), r"^weight_decay must be a finite number >= 0, got -1"),
    (dict(weight_decay=NAN), r"^weight_decay must be .*got nan"),
    (dict(update_freq=2.7), r"^update_freq must be an integer >= 1, got 2\.7 \(float\)"),
    (dict(update_freq=0), r"^update_freq must be an integer >= 1, got 0"),
    (dict(update_freq=True), r"^update_freq must be an integer >= 1, got True"),
    (dict(update_freq="2"), r"^update_freq must be an integer >= 1, got '2'"),
    (dict(kl_clip=0.0), r"^kl_clip must be None or a finite number > 0, got 0\.0"),
    (dict(kl_clip=NAN), r"^kl_clip must be .*got nan"),
    (dict(fisher="fish"), r"^unknown fisher 'fish'; valid: \['empirical', 'mc', 'exact'\]"),
    (dict(fisher=None), r"^unknown fisher None"),
    (dict(max_jacobian_numel=-1), r"^max_jacobian_numel must be an integer >= 0, got -1"),
    (dict(max_jacobian_numel=1.5), r"^max_jacobian_numel must be .*got 1\.5"),
    (dict(generator=42), r"^generator must be a torch\.Generator or None, got int"),
    (dict(backend="nope"), r"unknown backend 'nope'"),
]


@pytest.mark.parametrize("kwargs, needle", CONSTRUCT, ids=[f"{k}={v!r}" for (d, _) in CONSTRUCT
                                                           for k, v in d.items()])
def test_bad_hyperparameters_are_refused_at_construction(kwargs, needle):
    model = make_model("tokens")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = dict(lr=0.1, damping=0.5)
    args.update(kwargs)
    with pytest.raises(TengradError, match=needle):
        TENGraD(model, **args)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert no_hooks(model)                       # nothing was attached to the model


@pytest.mark.parametrize("first", [
    lambda m: m.parameters(), lambda m: list(m.parameters()), lambda m: m.lin1.weight,
    lambda m: [{"params": m.parameters()}], lambda m: None])
def test_a_non_module_first_argument_says_it_needs_the_model_and_shows_the_call(first):
    model = make_model("tokens")
    with pytest.raises(TENGraDError) as info:
        TENGraD(first(model), lr=0.1, damping=0.5)
    msg = str(info.value)
    assert "needs the model" in msg and "TENGraD(model, lr=..., damping=...)" in msg
    assert "not TENGraD(model.parameters(), ...)" in msg


def test_a_model_without_trainable_parameters_is_refused():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(TENGraDError, match="no trainable parameters"):
        TENGraD(model, 0.1, 0.5)


# ---------------------------------------------------------------- values changed between steps
STEP = [
    (0, "lr", NAN), (0, "lr", -1.0), (0, "lr", "0.1"), (0, "lr", True), (0, "damping", NAN),
    (0, "damping", INF), (0, "damping", 0.0), (0, "momentum", -0.5), (0, "momentum", 1.5),
    (0, "weight_decay", -1.0), (1, "lr", NAN), (1, "momentum", 1.5), (1, "weight_decay", -1),
]


@pytest.mark.parametrize("group, key, value", STEP, ids=[f"g{g}-{k}={v!r}" for g, k, v in STEP])
def test_bad_values_set_through_param_groups_are_refused_at_step(group, key, value):
    model = make_model("tokens")
    opt = TENGraD(model, 0.2, 0.5, momentum=0.9, update_freq=2,
                  param_groups=[{"params": list(model.lin1.parameters()), "lr": 0.3}])
    gen = torch.Generator().manual_seed(0)
    step_plain(model, opt, *make_batch("tokens", 5, "cross_entropy", gen))
    x, y = make_batch("tokens", 4, "cross_entropy", gen)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    good = opt.param_groups[group][key]
    opt.param_groups[group][key] = value
    snap = snapshot_all(model, opt)
    with pytest.raises(TENGraDError, match=rf"^param_groups\[{group}\]\['{key}'\] must be .*got"):
        opt.step()
    assert_unchanged(model, opt, snap)
    opt.param_groups[group][key] = good               # fixed: the same gradients step normally
    opt.step()
    assert not torch.equal(model.lin1.weight, snap["params"]["lin1.weight"])


@pytest.mark.parametrize("attr, value, needle", [
    ("update_freq", 2.7, r"update_freq must be an integer >= 1, got 2\.7"),
    ("kl_clip", -1.0, r"kl_clip must be None or a finite number > 0, got -1\.0"),
    ("fisher", "fish", r"unknown fisher 'fish'"),
])
def test_bad_optimizer_attributes_are_refused_at_step(attr, value, needle):
    model, opt = trained()
    x, y = make_batch("tokens", 4, "cross_entropy", torch.Generator().manual_seed(1))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    setattr(opt, attr, value)
    snap = snapshot_all(model, opt)
    with pytest.raises(TENGraDError, match=needle):
        opt.step()
    assert_unchanged(model, opt, snap)


# ---------------------------------------------------------------- blocks unused in a forward
class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head_a = nn.Linear(6, 3)
        self.head_b = nn.Linear(6, 3)

    def forward(self, x, head="a"):
        return (self.head_a if head == "a" else self.head_b)(torch.tanh(self.body(x)))


def _two_head_run(set_to_none: bool, update_freq: int, fisher: str = "empirical"):
    torch.manual_seed(0)
    model = TwoHeads().double()
    opt = TENGraD(model, 0.2, 0.5, momentum=0.9, weight_decay=0.01, update_freq=update_freq, fisher=fisher,
                  generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(1)
    snaps = []
    for s, head in enumerate(["a", "b", "a", "a", "b"]):
        x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (5,), generator=gen)
        out = model(x, head)
        opt.zero_grad(set_to_none=set_to_none)
        if fisher == "empirical":
            F.cross_entropy(out, y).backward()
        else:
            opt.backward(out, y, loss="cross_entropy")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        idle = "head_b" if head == "a" else "head_a"
        for n in (f"{idle}.weight", f"{idle}.bias"):
            assert torch.equal(getattr(model, idle).get_parameter(n.split(".")[1]), before[n]), (s, n)
        assert idle in opt.skipped and f"block {idle} " in opt.explain()
        assert "skipped at the last step" in opt.explain()
        snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return snaps, opt


@pytest.mark.parametrize("update_freq, fisher", [(1, "empirical"), (2, "empirical"), (2, "mc"), (1, "exact")])
def test_a_head_unused_in_this_forward_is_skipped_with_zero_grad_set_to_none_false(update_freq, fisher):
    with_none, _ = _two_head_run(True, update_freq, fisher)
    with_zeros, opt = _two_head_run(False, update_freq, fisher)
    assert "zero gradient and no captured forward" in opt.skipped["head_a"]
    for a, b in zip(with_none, with_zeros):       # zeros instead of None: bit-identical steps
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_gradient_without_a_captured_forward_is_still_an_error_naming_the_layer():
    model, opt = trained(update_freq=1)            # every step is a curvature step
    x, y = make_batch("tokens", 4, "cross_entropy", torch.Generator().manual_seed(1))
    opt.zero_grad()
    model.eval()                                   # not captured, but gradients flow
    F.cross_entropy(model(x), y).backward()
    model.train()
    snap = snapshot_all(model, opt)
    with pytest.raises(TENGraDError, match=r"layer 'emb' \(Embedding\) has a non-zero gradient but no captured"):
        opt.step()
    assert_unchanged(model, opt, snap)


# ---------------------------------------------------------------- compiled plans (checks.py)
def linear_case():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    return layer, tengrad.compile(layer), torch.randn(5, 4), torch.randn(5, 3)


def emb_case(pad=None):
    torch.manual_seed(0)
    layer = nn.Embedding(10, 3, padding_idx=pad)
    ids = torch.randint(0, 10, (4, 6))
    return layer, tengrad.compile(layer), ids, torch.randn(4, 6, 3)


PLAN = {
    "unknown order": (linear_case, lambda c, x, gy: c.gram(x, gy, order="nope"),
                      TengradError, r"Linear\.gram: unknown order 'nope'; valid: \[.*'direct'.*'factored'"),
    "order not a string": (linear_case, lambda c, x, gy: c.vjp(x, gy, torch.ones(5), order=3),
                           TengradError, r"Linear\.vjp: unknown order 3"),
    "gram(list, gy)": (linear_case, lambda c, x, gy: c.gram(x.tolist(), gy),
                       ShapeError, r"Linear\.gram: x must be a torch\.Tensor, got list"),
    "gy not a tensor": (linear_case, lambda c, x, gy: c.jacobian(x, None),
                        ShapeError, r"Linear\.jacobian: gy must be a torch\.Tensor, got NoneType"),
    "integer p": (linear_case, lambda c, x, gy: c.jvp(x, gy, [torch.ones(3, 4, dtype=torch.long), torch.ones(3)]),
                  ShapeError, r"Linear\.jvp: p\[0\] must be floating point, got torch\.int64"),
    "p a tensor": (linear_case, lambda c, x, gy: c.jvp(x, gy, torch.ones(3, 4)),
                   ShapeError, r"Linear\.jvp: p must be a list of 2 tensors"),
    "p holds a list": (linear_case, lambda c, x, gy: c.jvp(x, gy, [[1.0], torch.ones(3)]),
                       ShapeError, r"Linear\.jvp: p\[0\] must be a tensor, got list"),
    "integer u": (linear_case, lambda c, x, gy: c.vjp(x, gy, torch.ones(5, dtype=torch.long)),
                  ShapeError, r"Linear\.vjp: u must be floating point, got torch\.int64"),
    "u not a tensor": (linear_case, lambda c, x, gy: c.vjp(x, gy, [1.0] * 5),
                       ShapeError, r"Linear\.vjp: u must be a tensor"),
    "integer x": (linear_case, lambda c, x, gy: c.gram(x.long(), gy),
                  ShapeError, r"Linear\.gram: x must be floating point, got torch\.int64"),
    "integer gy": (linear_case, lambda c, x, gy: c.gram(x, gy.long()),
                   ShapeError, r"Linear\.gram: gy must be floating point"),
    "meta x, cpu gy": (linear_case, lambda c, x, gy: c.gram(x.to("meta"), gy),
                       ShapeError, r"Linear\.gram: tensors on different devices \(x on meta, gy on cpu"),
    "meta u": (linear_case, lambda c, x, gy: c.vjp(x, gy, torch.ones(5, device="meta")),
               ShapeError, r"different devices.*u on meta"),
    "meta p": (linear_case, lambda c, x, gy: c.jvp(x, gy, [torch.ones(3, 4, device="meta"), torch.ones(3)]),
               ShapeError, r"different devices.*p\[0\] on meta"),
    "id out of range": (emb_case, lambda c, x, gy: c.gram(x.index_fill(1, torch.tensor([2]), 10), gy),
                        ShapeError, r"Embedding: id 10 at x\[0, 2\] is out of range for weight with 10 rows"),
    "id -1": (emb_case, lambda c, x, gy: c.jacobian(x.index_fill(1, torch.tensor([4]), -1), gy),
              ShapeError, r"Embedding: id -1 at x\[0, 4\] is out of range"),
    "id -1 in jvp": (emb_case, lambda c, x, gy: c.jvp(x.index_fill(0, torch.tensor([3]), -1), gy, [torch.ones(10, 3)]),
                     ShapeError, r"id -1 at x\[3, 0\]"),
    "float ids": (emb_case, lambda c, x, gy: c.gram(x.double(), gy),
                  ShapeError, r"Embedding\.gram: x must hold integer ids"),
}


@pytest.mark.parametrize("case", list(PLAN))
def test_plan_arguments_are_checked_naming_the_argument(case):
    make, call, err, needle = PLAN[case]
    layer, plan, x, gy = make()
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with pytest.raises(err, match=needle):
        call(plan, x, gy)
    assert all(torch.equal(p, before[n]) for n, p in layer.named_parameters())


def test_padding_ids_pass_the_check_and_are_dropped_inside():
    layer, plan, x, gy = emb_case(pad=0)
    x[:, 0] = 0
    jac = plan.jacobian(x, gy)[0]                                   # [m, 10, 3]
    expected = torch.zeros(4, 10, 3)
    for i in range(4):
        for t in range(6):
            if x[i, t] != 0:
                expected[i, x[i, t]] += gy[i, t]
    assert torch.allclose(jac, expected)


def test_the_id_check_runs_once_per_tensor_version():
    layer, plan, x, gy = emb_case()
    plan.gram(x, gy)
    x[0, 0] = 99                                   # an in-place change makes a new version: checked again
    with pytest.raises(ShapeError, match=r"id 99 at x\[0, 0\]"):
        plan.gram(x, gy)


# ---------------------------------------------------------------- the command line
CLI = [
    (["nn.Conv2d(3, 8, 3)", "--input", "0,3,10,10"], r"--input.*'0,3,10,10': every size must be a positive integer"),
    (["nn.Conv2d(3, 8, 3)", "--input", "2,3,-1,10"], r"--input.*every size must be a positive integer"),
    (["nn.Conv2d(3, 8, 3)", "--input", "2,3,a,10"], r"--input.*not a shape"),
    (["nn.Conv2d(3, 8, 3)", "--input", "2,3,10,10", "--batch", "0,-1"], r"--batch.*'0,-1': every size"),
    (["nn.Conv2d(3, 8, 3)", "--input", "2,3,10,10", "--memory-cap", "-1"], r"--memory-cap.*positive number of GiB"),
    (["nn.Conv2d(3, 8, 3)", "--input", "2,3,10,10", "--memory-cap", "nan"], r"--memory-cap"),
    (["nn.Conv2d(3, 8, 3)", "--input", "2,4,10,10"], r"Conv2d: input of shape \(2, 4, 10, 10\) is not valid"),
    (["nn.PReLU()", "--input", "2,3"], r"no tengrad spec for module type PReLU"),
    (["3 + 4", "--input", "2,3"], r"'3 \+ 4' is not an nn\.Module"),
    (["nn.Linear(3, 2)"], r"the following arguments are required: --input"),
    (["nn.Linear(3, 2)", "--input", "2,3", "--dtype", "int8"], r"--dtype: invalid choice"),
]


@pytest.mark.parametrize("args, needle", CLI, ids=[" ".join(a[1:]) for a, _ in CLI])
def test_cli_prints_one_line_errors_with_exit_code_2(args, needle, capsys):
    assert cli(["explain", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tengrad explain: error: "), captured.err
    assert __import__("re").search(needle, lines[0]), lines[0]
    assert captured.out == ""


# ---------------------------------------------------------------- the fallback warning
class Scale(nn.Module):
    """A layer type no spec is registered for."""

    def __init__(self, n):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(n, 1, 1))

    def forward(self, x):
        return x * self.gain


def test_fallback_warning_is_one_line_per_layer_type():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Scale(4), nn.PReLU(), nn.Conv2d(4, 4, 3),
                          Scale(4), nn.PReLU(), nn.Flatten(), nn.Linear(4, 2))
    with pytest.warns(UserWarning) as rec:
        TENGraD(model, 0.1, 0.5)
    text = str(rec[0].message)
    lines = text.splitlines()
    assert len(rec) == 1 and len(lines) == 3, text                # header + Scale + PReLU
    assert lines[1].startswith("  Scale (1.gain, 4.gain): unsupported: no tengrad spec for module type Scale")
    assert lines[2].startswith("  PReLU (2.weight, 5.weight): ")
    assert "registered" not in text and all(len(line) < 160 for line in lines)
