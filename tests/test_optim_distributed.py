"""Data-parallel TENGraD on 2 and 3 gloo processes (CPU, float64), against the dense oracle on the global
batch and a single-process TENGraD (tests/support/distributed_workers.py runs on each rank).

One process group per world size runs every check of that size (a torch import per process costs
seconds); each group has a 30 s collective timeout and the parent kills it after 150 s, so a stuck rank
fails the tests instead of hanging them. Batches are uneven across ranks and change between steps.
"""
from __future__ import annotations

import pytest
import torch

from support import dist_harness, distributed_workers
from tengrad.optim import TENGraD, TENGraDError
from tengrad.optim import distributed_plan as dplan

TOL = 1e-8
UNEVEN = {2: [[3, 2], [2, 4], [1, 3], [4, 2]], 3: [[2, 3, 1], [3, 1, 2], [1, 2, 2], [2, 2, 3]]}


def _checks(world: int) -> list:
    s = UNEVEN[world]
    exact = [
        ("exact-empirical-k1", dict(fisher="empirical", k=1, ddp=False, sizes=s[:2])),
        ("exact-empirical-k3-ddp", dict(fisher="empirical", k=3, ddp=True, sizes=s)),
        ("exact-mc-k1-ddp", dict(fisher="mc", k=1, ddp=True, sizes=s[:2])),
        ("exact-exact-k3-mse", dict(fisher="exact", loss="mse", k=3, ddp=False, sizes=s)),
    ]
    if world == 2:
        exact += [
            ("exact-empirical-k3", dict(fisher="empirical", k=3, ddp=False, sizes=s)),
            ("exact-mc-k3", dict(fisher="mc", k=3, ddp=False, sizes=s)),
            ("exact-exact-k1-ddp", dict(fisher="exact", k=1, ddp=True, sizes=s[:2])),
        ]
    checks = [(name, "check_exact", kw) for name, kw in exact]
    checks += [("single-exact-k3-groups", "check_single_process",
                dict(sizes=s, k=3, fisher="exact", param_groups=True)),
               ("single-empirical-k1-ddp", "check_single_process",
                dict(sizes=s[:2], k=1, fisher="empirical", ddp=True)),
               ("local-empirical-k1", "check_local", dict(sizes=s[:2], k=1)),
               ("local-mc-k3", "check_local", dict(sizes=s, k=3, fisher="mc")),
               ("failures", "check_failures", dict(ddp=False)),
               ("checkpoint", "check_checkpoint", dict(sizes=s))]
    if world == 2:
        checks += [("local-exact-k1", "check_local", dict(sizes=s[:2], k=1, fisher="exact", loss="mse")),
                   ("failures-ddp", "check_failures", dict(ddp=True)),
                   ("demo", "check_demo", {})]
    return checks


_RESULTS: dict[int, list] = {}


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def group(request):
    world = request.param
    if world not in _RESULTS:
        _RESULTS[world] = dist_harness.run(distributed_workers.run_many, world, _checks(world),
                                           timeout=150.0, pg_timeout=30.0)
    return world, _RESULTS[world]


def _names(world, fn):
    return [name for name, f, _ in _checks(world) if f == fn]


def test_exact_equals_dense_oracle_on_global_batch(group):
    world, results = group
    for name in _names(world, "check_exact"):
        r = results[0][name]
        assert r["worst"] < TOL, (name, r["worst"])
        assert all(res[name]["identical"] for res in results), name


def test_exact_equals_single_process_with_momentum_and_weight_decay(group):
    world, results = group
    for name in _names(world, "check_single_process"):
        for rank, res in enumerate(results):
            assert res[name]["worst"] < TOL, (name, rank, res[name]["worst"])
            assert res[name]["identical"], name


def test_local_is_bit_identical_and_averages_own_batch_directions(group):
    world, results = group
    for name in _names(world, "check_local"):
        for rank, res in enumerate(results):
            assert res[name]["identical"], (name, rank)
            assert res[name]["worst"] < TOL, (name, rank, res[name]["worst"])
        assert "approximation" in results[0][name]["explain"]


def test_failure_on_one_rank_raises_the_same_error_on_every_rank(group):
    world, results = group
    for name in _names(world, "check_failures"):
        reports = [res[name] for res in results]
        for case, needle in (("nan-grad", "non-finite gradient"), ("capture", "2 forward calls"),
                             ("cholesky", "Cholesky")):
            messages = reports[0][case]["messages"]
            assert messages[0] is not None and needle in messages[0], (name, case, messages)
            assert len(set(messages)) == 1, (name, case, messages)          # the same error everywhere
            assert f"rank {world - 1} at step 1" in messages[0]
            assert all(rep[case]["unchanged"] and rep[case]["identical"] for rep in reports), (name, case)
        for case in ("ok-before", "ok-after"):                            # and training goes on
            assert reports[0][case]["messages"] == [None] * world
            assert all(not rep[case]["unchanged"] and rep[case]["identical"] for rep in reports)


def test_checkpoint_from_rank0_restores_every_rank(group):
    world, results = group
    for rank, res in enumerate(results):
        assert res["checkpoint"]["identical"], rank
        assert res["checkpoint"]["worst"] < TOL, (rank, res["checkpoint"]["worst"])


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
    ex = dplan.choose(None, (8, 1000), (8, 10), 8, 8, 1, [8, 8], 10010, 2 ** 26)
    assert ex.form == dplan.FACTORS and ex.bytes == 8 * (1000 + 10) * 8
    # a LayerNorm(6) on 50 positions: rows (12 per sample) beat factors (2 * 300 per sample)
    ex = dplan.choose(None, (8, 50, 6), (8, 50, 6), 8, 8, 1, [8, 3], 12, 2 ** 26)
    assert ex.form == dplan.ROWS and ex.bytes == 8 * 12 * 8


def test_distributed_needs_a_process_group():
    model = torch.nn.Linear(3, 2)
    assert TENGraD(model, 0.1, 1.0)._dist is None          # "auto" outside a group: single process
    with pytest.raises(TENGraDError, match="initialised torch.distributed process group"):
        TENGraD(model, 0.1, 1.0, distributed="exact")
    with pytest.raises(TENGraDError, match="distributed must be"):
        TENGraD(model, 0.1, 1.0, distributed="everywhere")


def test_stuck_rank_makes_the_others_raise_within_the_group_timeout():
    # rank 1 never reaches step(); rank 0 must get an error from the 3 s collective timeout, not hang
    results = dist_harness.run(distributed_workers.check_stuck_rank, 2, 5.0, timeout=60.0, pg_timeout=3.0)
    first = results[0]
    assert first["raised"] is True, first
    assert first["seconds"] < 5.0, first


def test_distributed_demo_prints_its_table(group):
    world, results = group
    if world != 2:
        pytest.skip("the demo runs in the 2-rank group only (time)")
    r = results[0]["demo"]
    assert r["code"] == 0
    for needle in ("| optimizer", "| sgd", "| tengrad ", "distributed='exact' over 2 ranks",
                   "shares [13, 12]"):
        assert needle in r["out"], (needle, r["out"])
