"""Robust at the edges (issue 21): state integrity, bounded capture, clear refusals (single process), and
ranks that disagree (2 gloo ranks: the spawned group of tests/test_optim_distributed.py, whose workers
run ``check_agreement`` / ``check_dead_peer`` in tests/support/distributed_workers.py).

Every refusal is a named ``TengradError`` with parameters, momentum buffers, kept curvature and step
count bit-identical afterwards (support/snapshots.py); every case made to work is checked against the
dense float64 oracle (support/step_oracle.py)."""
from __future__ import annotations

import copy
import gc
import io
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tengrad
from support import background, distributed_workers
from support.optim_cases import make_batch, make_model
from support.numerics import rel_err
from support.snapshots import assert_unchanged, snapshot_all
from support.step_oracle import expected_steps, fisher_from_grads, per_sample_grads, step_against_oracle
from tengrad.optim import TENGraD, TENGraDError


def quiet_opt(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TENGraD(model, **{"prior": None, "step_rule": "natural", **kw})


def train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def batches(kind, sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [make_batch(kind, m, "cross_entropy", gen) for m in sizes]


# ---------------------------------------------------------------- bounded capture
@pytest.mark.parametrize("set_to_none", [True, False])
def test_an_abandoned_optimizer_holds_at_most_one_steps_records(set_to_none):
    """TENGraD built, then dropped but for its LR scheduler; the loop trains with SGD. After 50
    forward/backward passes the abandoned optimizer holds the records of the last one only."""
    model = make_model("tokens")
    sched = torch.optim.lr_scheduler.StepLR(quiet_opt(model, update_freq=1), step_size=10)
    gc.collect()
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    per_step = None
    for i, (x, y) in enumerate(batches("tokens", [4] * 50)):
        sgd.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(model(x), y).backward()
        sgd.step()
        held = sched.optimizer._capture.held()
        per_step = held if per_step is None else per_step
        assert held == per_step > 0, (i, held, per_step)
    assert sched.optimizer._capture.dropped == 49 * per_step


def test_remove_hooks_stops_capture_of_an_abandoned_optimizer():
    model = make_model("tokens")
    opt = quiet_opt(model, update_freq=1)
    opt.remove_hooks()
    for x, y in batches("tokens", [4] * 3):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
    assert opt._capture.held() == 0


def test_accumulated_forwards_keep_their_records_and_step_exactly():
    """Two micro-batches into one .grad, then one step: both forwards' records are used (the union
    batch's exact step, tests/test_training_loops.py checks more loops)."""
    model = make_model("mlp")
    opt = quiet_opt(model, lr=0.3, damping=0.5, momentum=0.0, update_freq=1, kl_clip=None)
    (x1, y1), (x2, y2) = batches("mlp", [3, 3])
    opt.zero_grad()
    (F.cross_entropy(model(x1), y1) / 2).backward()
    held = opt._capture.held()
    (F.cross_entropy(model(x2), y2) / 2).backward()
    assert opt._capture.held() == 2 * held and opt._capture.dropped == 0
    opt.step()
    assert all(b.curv.m == 6 for b in opt.blocks)


# ---------------------------------------------------------------- state integrity
def trained(path: str, dtype=torch.float64):
    """TokenNet after 2 steps of update_freq 3 (curvature kept, momentum buffers set)."""
    model = make_model("tokens", dtype=dtype)
    kw = dict(momentum=0.9, update_freq=3, kl_clip=1e-2)
    if path == "reuse":
        kw["max_jacobian_numel"] = 0
    opt = quiet_opt(model, lr=0.2, damping=0.3, **kw)
    train(model, opt, batches("tokens", [5, 4]))
    return model, opt


def fresh_sd(opt):
    """A state_dict to tamper with: torch's holds the optimizer's live per-parameter dicts and tensors."""
    return copy.deepcopy(opt.state_dict())


def refused(model, opt, sd, match):
    snap = snapshot_all(model, opt)
    with pytest.raises(TENGraDError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(model, opt, snap)


def kept(opt, path, float_x=False):
    """The first block keeping curvature on ``path`` (``float_x``: with a floating-point input)."""
    return next(b for b in opt.blocks if b.curv is not None and b.curv.path == path
                and (not float_x or b.curv.x.is_floating_point()))


def test_both_paths_are_kept_by_the_fixtures():
    assert kept(trained("auto")[1], "jacobian") and kept(trained("reuse")[1], "reuse")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_momentum_buffer_is_refused_by_name(value):
    model, opt = trained("auto")
    sd = fresh_sd(opt)
    sd["state"][2]["momentum_buffer"].view(-1)[1] = value
    refused(model, opt, sd, r"state of parameter 'norm.bias'.*'momentum_buffer' has 1 non-finite entry.*unchanged")


@pytest.mark.parametrize("path, key", [("reuse", "x"), ("reuse", "gy"), ("auto", "jac"), ("auto", "gram"),
                                       ("auto", "chol")])
def test_non_finite_kept_curvature_is_refused_by_name(path, key):
    model, opt = trained(path)
    b = kept(opt, "reuse" if key in ("x", "gy") else "jacobian", float_x=key == "x")
    sd = fresh_sd(opt)
    t = sd["tengrad"]["blocks"][b.name][key]
    t[(0,) * t.dim()] = float("nan")
    refused(model, opt, sd, rf"block '{b.name}': '{key}' has 1 non-finite entry")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_a_factor_of_another_damping_or_a_gram_of_other_rows_is_refused(dtype):
    model, opt = trained("auto", dtype)
    b = kept(opt, "jacobian")
    sd = fresh_sd(opt)
    c = sd["tengrad"]["blocks"][b.name]
    eye = torch.eye(c["gram"].shape[0], dtype=c["gram"].dtype)
    c["chol"] = torch.linalg.cholesky(c["gram"] + 2 * c["m"] * c["damping"] * eye)     # not K + m a I
    refused(model, opt, sd, rf"block '{b.name}': 'chol' does not factor 'gram' \+ m\*damping\*I")
    sd = fresh_sd(opt)
    c = sd["tengrad"]["blocks"][b.name]
    c["gram"] = c["gram"] * 1.5                    # self-consistent factor, but not the rows' Gram
    c["chol"] = torch.linalg.cholesky(c["gram"] + c["m"] * c["damping"] * eye)
    refused(model, opt, sd, rf"block '{b.name}': 'gram' is not the Gram matrix of the kept rows \('jac'\)")
    sd = fresh_sd(opt)
    sd["tengrad"]["blocks"][b.name]["chol"] = sd["tengrad"]["blocks"][b.name]["chol"].T.contiguous()
    refused(model, opt, sd, rf"block '{b.name}': 'chol' is not a Cholesky factor")
    sd = fresh_sd(opt)
    sd["tengrad"]["blocks"][b.name]["jac"] = sd["tengrad"]["blocks"][b.name]["jac"].to(torch.float16)
    refused(model, opt, sd, rf"block '{b.name}': 'jac' is torch.float16, this block computes in")


def _flip_in_file(blob: bytes, t: torch.Tensor) -> bytes:
    """The saved file with bit 0x40 of the most significant byte of one entry of ``t``'s storage
    flipped (the top exponent bit: the largest entry below 2 in magnitude becomes ~2^128 in float32,
    ~2^1024 in float64, the corruption that made training diverge), found by the storage's raw bytes in
    the file (torch.save stores each storage uncompressed)."""
    storage = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
    raw = storage.numpy().tobytes()
    at = blob.find(raw)
    assert at >= 0 and blob.find(raw, at + 1) < 0, "the tensor's bytes are not found once in the file"
    k = int(torch.where(storage.abs() < 2, storage.abs(), torch.zeros_like(storage)).argmax())
    pos = at + (k + 1) * t.element_size() - 1      # little endian: the last byte of the entry
    out = bytearray(blob)
    out[pos] ^= 0x40
    return bytes(out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("path, key", [("auto", "jac"), ("reuse", "x"), ("reuse", "gy"), ("auto", "chol"),
                                       ("reuse", "chol")])
def test_a_checkpoint_with_flipped_bytes_in_its_kept_curvature_is_refused(path, key, dtype):
    model, opt = trained(path, dtype)
    b = kept(opt, "reuse" if key in ("x", "gy") or path == "reuse" else "jacobian", float_x=key == "x")
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    clean = buf.getvalue()
    target = opt.state_dict()["tengrad"]["blocks"][b.name][key]
    flipped = torch.load(io.BytesIO(_flip_in_file(clean, target)))
    refused(model, opt, flipped, rf"curvature of block '{b.name}'")
    opt.load_state_dict(torch.load(io.BytesIO(clean)))     # the clean file loads (no false alarm)


def _steps_alike(pairs, sizes, seed):
    """Step every (model, opt) of ``pairs`` on the same batches; their parameters must stay bit-identical."""
    for x, y in batches("tokens", sizes, seed=seed):
        for model, opt in pairs:
            train(model, opt, [(x, y)])
        ref = pairs[0][0]
        for model, _ in pairs[1:]:
            for (n, p), q in zip(ref.named_parameters(), model.parameters()):
                assert torch.equal(p, q), n


def test_a_deep_copy_steps_exactly_against_the_oracle_and_as_the_original():
    model = make_model("tokens")
    opt = quiet_opt(model, lr=0.2, damping=0.3, momentum=0.0, update_freq=1, kl_clip=None)
    train(model, opt, batches("tokens", [5]))
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.model is model2 and opt2 is not opt and opt2._steps == 1
    x, y = batches("tokens", [6], seed=4)[0]
    moved, exact, _ = step_against_oracle(opt2, model2, x, y, 0.3)
    for n in exact:
        assert rel_err(moved[n], exact[n]) <= 1e-10, n
    train(model, opt, [(x, y)])          # the original, on the same batch: the same parameters
    for (n, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("path", ["auto", "reuse"])
def test_a_pickled_optimizer_resumes_bit_for_bit_mid_cycle(path):
    """torch.save((model, opt)) after 2 steps of update_freq 3 (kept curvature, momentum, KL clip and
    noise ratio): the loaded pair steps as the original does."""
    model, opt = trained(path)
    buf = io.BytesIO()
    torch.save((model, opt), buf)
    model2, opt2 = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert opt2.model is model2 and all(b.curv is not None for b in opt2.blocks)
    deep = copy.deepcopy((model, opt))
    _steps_alike([(model, opt), (model2, opt2), deep], [4, 6, 3, 5], seed=7)


def test_a_shallow_copy_is_refused_and_changes_nothing():
    model, opt = trained("auto")
    snap = snapshot_all(model, opt)
    with pytest.raises(TENGraDError, match=r"copy\.copy\(opt\) would be a second optimizer.*copy\.deepcopy"):
        copy.copy(opt)
    assert_unchanged(model, opt, snap)


# ---------------------------------------------------------------- clear refusals
def test_a_compiled_model_is_refused_at_construction_with_the_supported_pattern():
    model = make_model("mlp")
    with pytest.raises(tengrad.TengradError, match=r"torch\.compile.*opt = TENGraD\(model, \.\.\.\); "
                                                   r"compiled = torch\.compile\(model\)"):
        TENGraD(torch.compile(model), prior=None)


def test_compiling_after_construction_steps_exactly():
    """The supported pattern: TENGraD on the plain model, the loop on torch.compile(model) (dynamo's
    eager backend: the test checks the capture through dynamo's frames, not inductor's kernels)."""
    model = make_model("mlp")
    opt = quiet_opt(model, lr=0.3, damping=0.5, momentum=0.0, update_freq=1, kl_clip=None)
    compiled = torch.compile(model, backend="eager")
    x, y = batches("mlp", [4])[0]
    rows = per_sample_grads(model, x, y, "cross_entropy")
    g = {n: t.mean(0) for n, t in rows.items()}
    names = [n for n, _ in model.named_parameters()]
    exact = expected_steps(opt, model, fisher_from_grads(rows, names), names, g, 0.3, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # dynamo's notes on the hooks it does not trace
        opt.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert rel_err(p.detach() - before[n], exact[n]) <= 1e-10, n


@pytest.mark.parametrize("first", [True, False], ids=["curvature step", "reuse step"])
def test_a_batch_of_zero_is_refused_by_name_and_changes_nothing(first):
    model = make_model("mlp")
    opt = quiet_opt(model, update_freq=2)
    if not first:
        train(model, opt, batches("mlp", [4]))
    x, y = torch.randn(0, 5, dtype=torch.float64), torch.randint(0, 3, (0,))
    snap = snapshot_all(model, opt)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(tengrad.TengradError, match=r"batch of 0 samples \(dimension 0 of the model input\)"):
        opt.step()
    assert_unchanged(model, opt, snap)
    train(model, opt, batches("mlp", [4], seed=1))          # the next real batch steps
    assert opt._steps == snap["steps"] + 1


def test_the_exact_fisher_over_its_memory_cap_is_refused_with_the_number_and_the_alternative():
    """1000 classes, batch 32: the 1000 output vectors [32, 1000] and K and its factor, 32000^2 float32
    each: 7.75 GiB before any layer's rows."""
    need = 1000 * 32 * 1000 * 4 + 2 * 32000 ** 2 * 4
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1000))
    opt = TENGraD(model, fisher="exact", prior=None)
    x, y = torch.randn(32, 4), torch.randint(0, 1000, (32,))
    snap = snapshot_all(model, opt)
    out = model(x)
    opt.zero_grad()
    assert f"{need / 2**30:.2f}" == "7.75"
    with pytest.raises(TENGraDError, match=rf"fisher='exact' would allocate about {need / 2**30:.2f} GiB for C=1000 output "
                                           r"units and m=32 samples.*max_exact_fisher_bytes=2147483648.*fisher='mc'"):
        opt.backward(out, y, loss="cross_entropy")
    assert_unchanged(model, opt, snap)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(TENGraDError, match="max_exact_fisher_bytes must be an integer >= 1"):
        TENGraD(model, fisher="exact", max_exact_fisher_bytes=0, prior=None)


def test_the_exact_fisher_at_its_cap_runs_and_one_byte_under_is_refused():
    """Linear(4, 3), m = 5: 3 output vectors [5, 3] and K and its factor, 15 x 15, in float64."""
    need = 3 * 15 * 8 + 2 * 15 ** 2 * 8
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    for cap, ok in ((need, True), (need - 1, False)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3)).double()
        opt = TENGraD(model, fisher="exact", max_exact_fisher_bytes=cap, prior=None)
        out = model(x)
        opt.zero_grad()
        if ok:
            opt.backward(out, y, loss="cross_entropy")
            opt.step()
            assert opt._steps == 1
        else:
            with pytest.raises(TENGraDError, match=f"over max_exact_fisher_bytes={cap} "):
                opt.backward(out, y, loss="cross_entropy")


# ---------------------------------------------------------------- ranks that disagree (2 gloo ranks)
process_groups = pytest.mark.background("distributed")


@process_groups
def test_a_dead_peer_gives_a_named_error_within_the_group_timeout():
    """Rank 1 leaves its group before the step (its sockets close, as a killed process's do)."""
    first = background.get("distributed").result(distributed_workers.DEAD)[0]
    assert first["raised"] is True, first
    assert first["error"].startswith("PeerError") and "status all-gather" in first["error"], first
    assert first["seconds"] < distributed_workers.DEAD_PG_TIMEOUT + 5, first


@process_groups
def test_ranks_that_disagree_raise_the_same_named_error_with_nothing_changed():
    """2 ranks: a plain model initialised with another seed, another depth (once a SIGABRT inside gloo),
    lr changed on one rank, an empty batch on one rank; agreeing ranks step."""
    results = background.get("distributed").result(distributed_workers.WORLD_2)
    reports = [r["agreement"] for r in results]
    expect = {"different seeds": ("construction", "ReplicaMismatchError", "parameter values"),
              "different depths": ("construction", "ReplicaMismatchError", "number of parameter"),
              "lr changed on one rank": ("step", "ReplicaMismatchError", "param_groups[0].lr: rank 0 0.3, rank 1 0.1"),
              "empty rank": ("step", "TENGraDError", "rank 1 at step 1: an empty batch")}
    for case, (where, error, needle) in expect.items():
        texts = {r[case]["text"] for r in reports}
        assert len(texts) == 1, (case, texts)                    # the same error on every rank
        for r in reports:
            assert (r[case]["where"], r[case]["error"]) == (where, error), (case, r[case])
            assert needle in r[case]["text"], (case, r[case]["text"])
            assert r[case]["unchanged"] is True, case
    assert all(r["agreeing ranks"]["error"] is None for r in reports)


# ---------------------------------------------------------------- no graph kept across steps
def test_a_long_run_keeps_no_earlier_steps_records_or_graphs():
    """The capture's gradient hooks sit on autograd nodes; a hook closure that held its node made a cycle
    through autograd's C++ hook list that gc cannot collect, so every curvature step's graph and records
    stayed alive (7.8 MB per step on a 2-layer byte LM; OOM after ~550 steps at d 128). After 30 curvature
    steps (MultiheadAttention's op-level uses, module-level Linear and Embedding blocks) the live records
    are at most one step's."""
    from tengrad.optim.capture.record import Use

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, ids):
            h = self.emb(ids)
            return self.head(self.att(h, h, h, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, update_freq=1, prior=None)
    gen = torch.Generator().manual_seed(0)

    def live():
        gc.collect()
        return sum(isinstance(o, Use) for o in gc.get_objects())

    per_step = None
    for s in range(30):
        ids, y = torch.randint(0, 20, (6, 5), generator=gen), torch.randint(0, 3, (6,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(ids), y).backward()
        if s == 1:
            per_step = live()                 # one step's records, before its step() takes them
        opt.step()
    assert 0 < per_step and live() <= per_step, (per_step, live())
