"""Smoke runs of benchmarks/tta.py --task lm|resnet (--quick --no-tune: a tiny model, a few steps, two
methods) and benchmarks/robustness_lm.py (one cell): the scripts run end to end and write their JSON and
PNG; the LM corpus split is deterministic and by file; a method whose package is missing is "not run",
never "diverged". The benchmarks themselves are not run here."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

pytest.importorskip("sklearn", reason="the resnet smoke run uses scikit-learn's digits")
pytest.importorskip("matplotlib", reason="the benchmarks plot with matplotlib")


def test_lm_corpus_split_is_by_file_and_deterministic():
    from tasks import stdlib_corpus

    files = stdlib_corpus.source_files(stdlib_corpus.sysconfig.get_paths()["stdlib"])
    assert files == sorted(files) and all(f.endswith(".py") for f in files)
    assert not any("site-packages" in f for f in files)
    val = [f for f in files if stdlib_corpus.is_validation(f, 0.1)]
    assert 0 < len(val) < len(files) // 4
    assert val == [f for f in files if stdlib_corpus.is_validation(f, 0.1)]


@pytest.mark.parametrize("task,methods", [("lm", "adamw,tengrad,tengrad-prior,tengrad-soap"), ("resnet", "tengrad")])
def test_tta_task_quick_writes_the_report(task, methods, tmp_path, capsys):
    import tta

    assert tta.main(["--task", task, "--quick", "--no-tune", "--seeds", "0", "--methods", methods,
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "TENGraD (defaults)" in out
    # a verdict against a peer that ran beside it, or none (TENGraD alone is not a win)
    assert ("acceptance" in out) if "adamw" in methods else ("no verdict" in out and "acceptance" not in out)
    assert (tmp_path / "tta.png").stat().st_size > 0
    with open(tmp_path / "tta_seed0.json") as f:
        blob = json.load(f)
    assert [r["method"] for r in blob["runs"]] == methods.split(",")
    metric = blob["meta"]["metric"]
    assert all(len(r["points"]) >= 2 and metric in r["points"][-1] for r in blob["runs"])


def test_a_missing_package_is_not_run(monkeypatch):
    import peers
    from task_run import TaskRun
    import tasks

    monkeypatch.setitem(peers.PACKAGES, "kfac", ("no_such_module_xyz", "install it"))
    task = tasks.get("lm", quick=True)
    r = TaskRun("kfac", "kfac", dict(lr=0.1, damping=0.1), task, task.load(), steps=2)
    assert r.done and r.not_run.startswith("not run") and not r.diverged


def test_robustness_lm_quick_one_cell(tmp_path, capsys):
    import robustness_lm

    assert robustness_lm.main(["--quick", "--lrs", "0.3", "--dampings", "1", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "robustness_lm.json") as f:
        res = json.load(f)["results"]
    assert len(res) == 1 and res[0]["method"] == "tengrad" and res[0]["best"] == res[0]["best"]
    assert (tmp_path / "robustness_lm.png").stat().st_size > 0
    assert "damping \\ lr" in capsys.readouterr().out


def test_schedule_is_cosine_to_zero_for_every_method():
    from tasks.base import schedule_factor
    from task_run import TaskRun
    import tasks

    assert schedule_factor(None, 5, 10) == 1.0
    assert [round(schedule_factor("cosine", n, 4), 12) for n in range(5)] == [1.0, 0.853553390593, 0.5,
                                                                               0.146446609407, 0.0]
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        schedule_factor("linear", 0, 4)
    task = tasks.get("resnet", quick=True)
    assert task.schedule == "cosine" and tasks.get("resnet", quick=True, schedule="none").schedule is None
    data = task.load()
    for method, hp in (("sgd", dict(lr=0.1)), ("tengrad", {})):
        r = TaskRun(method, method, hp, task, data, steps=3)
        lr0 = r.opt.param_groups[0]["lr"]
        seen = []
        while not r.done:
            r.advance()
            seen.append(r.opt.param_groups[0]["lr"] / lr0)
        assert not r.diverged, r.diverged
        assert seen == pytest.approx([0.75, 0.25, 0.0]), (method, seen)


@pytest.mark.parametrize("task_name", ["3c1f", "resnet", "lm"])
def test_kfac_steps_on_every_tasks_loss(task_name):
    """ASDL's K-FAC asks its loss for a ``reduction`` argument; the tasks' losses get one (peers.py
    ``with_reduction``): a few steps run on the image tasks; on the LM ASDL refuses
    nn.MultiheadAttention's projection at its first step, and the run says so ("refused: ...")."""
    pytest.importorskip("asdl", reason="ASDL K-FAC is the bench extra (pip install asdfghjkl==0.1a5)")
    from task_run import TaskRun
    import tasks

    task = tasks.get(task_name, quick=True)
    r = TaskRun("kfac", "kfac", dict(lr=0.001, damping=1.0), task, task.load(), steps=3)
    while not r.done:
        r.advance()
    if task_name == "lm":
        assert r.diverged.startswith("refused: ") and "Not supported module" in r.diverged, r.diverged
        return
    assert not r.not_run and not r.diverged, r.diverged
    assert r.n == 3
