"""Data-parallel TENGraD on 2 and 3 gloo processes (CPU, float64), against the dense oracle on the global
batch and a single-process TENGraD (tests/support/distributed_workers.py runs on each rank).

Three processes are spawned once (a torch import per process costs seconds) and run every check on 3 ranks,
then every check on 2, then the stuck-rank check (support/distributed_workers.phases()); each group has a
30 s collective timeout and the parent kills the processes after 150 s a phase, so a stuck rank fails the
tests instead of hanging them. Batches are uneven across ranks and change between steps. The processes
start when collection ends and run beside the rest of the suite (support/background.py); these tests
run last and assert on what the ranks returned.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tengrad
from support import background, distributed_workers
from tengrad.optim import TENGraD, TENGraDError
from tengrad.optim.estimator import owners as dplan

TOL = 1e-8
process_groups = pytest.mark.background("distributed")     # the tests that read what the ranks returned


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def group(request):
    world = request.param
    run = background.get("distributed")
    return world, run.result(distributed_workers.WORLD_2 if world == 2 else distributed_workers.WORLD_3)


def _names(world, fn):
    return [name for name, f, _ in distributed_workers.checks(world) if f == fn]


@process_groups
def test_exact_equals_dense_oracle_on_global_batch(group):
    world, results = group
    for name in _names(world, "check_exact"):
        r = results[0][name]
        assert r["worst"] < TOL, (name, r["worst"])
        assert all(res[name]["identical"] for res in results), name


@process_groups
def test_exact_equals_single_process_with_momentum_and_weight_decay(group):
    world, results = group
    for name in _names(world, "check_single_process"):
        for rank, res in enumerate(results):
            assert res[name]["worst"] < TOL, (name, rank, res[name]["worst"])
            assert res[name]["identical"], name


@process_groups
def test_gradient_accumulation_with_no_sync_is_the_global_union_step(group):
    """Uneven micro-batches on each rank (DDP's no_sync() for all but the last, or a plain model), with
    update_freq 1 and 3: the dense oracle on the union of every rank's micro-batches."""
    world, results = group
    names = [name for name, _, _ in distributed_workers.checks(world) if name.startswith("accumulate-")]
    if world != 2:
        pytest.skip("accumulation runs on the 2-rank group only (one spawn per suite; the 3-rank group "
                    "runs the other checks)")
    assert names
    for name in names:
        for rank, res in enumerate(results):
            assert res[name]["identical"], (name, rank)
        assert results[0][name]["worst"] < TOL, (name, results[0][name]["worst"])


@process_groups
def test_local_is_bit_identical_and_averages_own_batch_directions(group):
    world, results = group
    for name in _names(world, "check_local"):
        for rank, res in enumerate(results):
            assert res[name]["identical"], (name, rank)
            assert res[name]["worst"] < TOL, (name, rank, res[name]["worst"])
        assert "approximation" in results[0][name]["explain"]


@process_groups
def test_failure_on_one_rank_raises_the_same_error_on_every_rank(group):
    world, results = group
    for name in _names(world, "check_failures"):
        reports = [res[name] for res in results]
        for case, needle in (("nan-grad", "non-finite gradient"), ("capture", "2 calls in one forward"),
                             ("cholesky", "Cholesky")):
            messages = reports[0][case]["messages"]
            assert messages[0] is not None and needle in messages[0], (name, case, messages)
            assert len(set(messages)) == 1, (name, case, messages)          # the same error everywhere
            assert f"rank {world - 1} at step 1" in messages[0]
            assert all(rep[case]["unchanged"] and rep[case]["identical"] for rep in reports), (name, case)
        for case in ("ok-before", "ok-after"):                            # and training goes on
            assert reports[0][case]["messages"] == [None] * world
            assert all(not rep[case]["unchanged"] and rep[case]["identical"] for rep in reports)


@process_groups
def test_checkpoint_from_rank0_restores_every_rank(group):
    world, results = group
    for rank, res in enumerate(results):
        assert res["checkpoint"]["identical"], rank
        assert res["checkpoint"]["worst"] < TOL, (rank, res["checkpoint"]["worst"])


@process_groups
def test_explain_shows_exchange_and_bytes(group):
    world, results = group
    text = results[0]["exact-empirical-k3-ddp"]["explain"]
    assert f"distributed='exact' over {world} ranks (gloo)" in text
    assert "DDP model" in text and "comm hook" in text
    assert "owner rank" in text and "J g gather" in text and " B" in text
    plain = results[0]["exact-empirical-k1"]["explain"]
    assert "plain model: the step all-reduces" in plain and "(gradient): all-reduce" in plain


# ------------------------------------------------------------------ no process group needed
def test_owner_assignment_is_longest_processing_time():
    # by cost 5 -> rank 0, 4 -> rank 1, 3 -> rank 1 (load 4 < 5), 1 -> rank 0: loads 6 and 7
    assert dplan.assign_owners([5.0, 1.0, 4.0, 3.0], 2) == [0, 0, 1, 1]
    assert dplan.assign_owners([1.0, 1.0, 1.0], 3) == [0, 1, 2]
    assert dplan.assign_owners([], 4) == []


def test_exchange_picks_fewer_bytes():
    # a 2-D Linear(1000, 10): factors (x 1000 + gy 10 per sample) beat rows (10010 per sample)
    plan = tengrad.compile(nn.Linear(1000, 10))      # real plans: the owner's Gram is priced by them
    ex = dplan.choose(plan, (8, 1000), (8, 10), 8, 8, 1, [8, 8], 10010, 2 ** 26)
    gram = float(plan.sized((16, 1000), (16, 10)).cost("gram").flops)
    assert ex.owner_flops == pytest.approx(gram + 16 ** 3 / 3.0)
    assert ex.form == dplan.FACTORS and ex.bytes == 8 * (1000 + 10) * 8
    # a LayerNorm(6) on 50 positions: rows (12 per sample) beat factors (2 * 300 per sample)
    ex = dplan.choose(tengrad.compile(nn.LayerNorm(6)), (8, 50, 6), (8, 50, 6), 8, 8, 1, [8, 3], 12, 2 ** 26)
    assert ex.form == dplan.ROWS and ex.bytes == 8 * 12 * 8


def test_distributed_needs_a_process_group():
    model = torch.nn.Linear(3, 2)
    assert not TENGraD(model, 0.1, 1.0, prior=None).distributed         # "auto" outside a group: single process
    with pytest.raises(TENGraDError, match="initialised torch.distributed process group"):
        TENGraD(model, 0.1, 1.0, distributed="exact", prior=None)
    with pytest.raises(TENGraDError, match="distributed must be"):
        TENGraD(model, 0.1, 1.0, distributed="everywhere", prior=None)


@process_groups
def test_stuck_rank_makes_the_others_raise_within_the_group_timeout():
    # rank 1 never reaches step(); rank 0 must get an error from the 3 s collective timeout, not hang
    results = background.get("distributed").result(distributed_workers.STUCK)
    first = results[0]
    assert first["raised"] is True, first
    assert first["seconds"] < distributed_workers.STALL, first


@process_groups
def test_distributed_demo_prints_its_table():
    r = background.get("distributed").result(distributed_workers.WORLD_2)[0]["demo"]     # 2 ranks only (time)
    assert r["code"] == 0
    for needle in ("| optimizer", "| sgd", "| tengrad ", "distributed='exact' over 2 ranks",
                   "shares [13, 12]"):
        assert needle in r["out"], (needle, r["out"])


def _under_prior(world, results, fn: str, errors: tuple[str, ...]) -> list[str]:
    """The names of ``fn``'s checks (both modes present), each rank's parameters and kept prior identical
    and its ``errors`` under TOL."""
    names = _names(world, fn)
    assert {n.split("-")[0] for n in names} == {"local", "exact"}
    for name in names:
        for rank, res in enumerate(results):
            r = res[name]
            assert r["identical"] and r["same_prior"], (name, rank)
            assert all(r[e] < TOL for e in errors), (name, rank, {e: r[e] for e in errors})
    return names


@process_groups
def test_a_prior_on_several_ranks_steps_the_exact_d_for_one_d_of_the_global_gradient(group):
    """prior="adam" / "soap": the moments are the global gradient's (against the oracle's own), the kept D
    is bit-identical on every rank, and the step is -lr (F + a D)^-1 g on the global batch ("exact") or
    -lr mean_r (F_r + a D)^-1 g ("local"), plain and DDP models."""
    world, results = group
    for name in _under_prior(world, results, "check_prior", ("worst", "worst_moments")):
        if "soap" in name:
            assert results[0][name]["rotated"] > 0, name       # the eigenbasis prior was in the steps
        assert ("approximation" in results[0][name]["explain"]) == name.startswith("local"), name


@process_groups
def test_adam_rule_on_several_ranks_is_the_rule_step_for_adams_m_of_the_global_gradient(group):
    world, results = group
    for name in _under_prior(world, results, "check_rule", ("worst", "worst_m", "worst_moments")):
        assert results[0][name]["clipped"] > 0, name      # the update clip bound in some steps
