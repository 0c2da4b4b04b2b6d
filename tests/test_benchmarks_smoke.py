"""Smoke runs of benchmarks/robustness.py, benchmarks/tta.py (--quick: sklearn digits, a tiny 3C1F,
a few steps per method) and benchmarks/step.py --models (tiny examples, one timed step): the scripts
parse their arguments, run every method, write their JSON and PNG, and report a diverging
configuration or a baseline that raises instead of raising. The benchmarks themselves are not run here."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "lab"))

pytest.importorskip("sklearn", reason="the smoke runs use scikit-learn's digits")
pytest.importorskip("matplotlib", reason="the benchmarks plot with matplotlib")
HAVE_ASDL = importlib.util.find_spec("asdl") is not None


def test_robustness_quick_reports_every_cell(tmp_path, capsys):
    import robustness

    methods = "tengrad,kfac,sgd" if HAVE_ASDL else "tengrad,sgd"
    assert robustness.main(["--quick", "--methods", methods, "--out", str(tmp_path)]) == 0
    with open(tmp_path / "robustness.json") as f:
        res = json.load(f)["results"]
    assert sorted({r["method"] for r in res}) == sorted(methods.split(","))
    assert all(0.0 <= r["best_acc"] <= 1.0 for r in res)
    assert (tmp_path / "robustness.png").stat().st_size > 0
    assert "damping \\ lr" in capsys.readouterr().out


def test_a_diverging_cell_is_reported_not_raised(tmp_path):
    from runner import Run, load_data

    _, data = load_data("digits", 128, 64)
    r = Run("sgd huge lr", "sgd", dict(lr=1e30), data, epochs=2, batch=32, width=2, hidden=8)
    while not r.done:
        r.advance()
    assert r.diverged and r.steps < 8
    bad = Run("tengrad refused", "tengrad", dict(lr=-1.0), data, epochs=1, batch=32, width=2, hidden=8)
    assert bad.done and bad.diverged.startswith("refused")


def test_tta_quick_writes_the_report(tmp_path, capsys):
    import tta

    methods = "sgd,tengrad,kfac" if HAVE_ASDL else "sgd,tengrad"
    assert tta.main(["--quick", "--seeds", "0", "--methods", methods, "--out", str(tmp_path),
                     "--tuning", str(tmp_path / "none.json")]) == 0
    out = capsys.readouterr().out
    assert "time to 88%" in out and "TENGraD (defaults)" in out
    assert (tmp_path / "tta.png").stat().st_size > 0
    with open(tmp_path / "tta_seed0.json") as f:
        runs = json.load(f)["runs"]
    assert [r["method"] for r in runs] == methods.split(",")


def test_step_real_architectures_report_every_method(capsys):
    """benchmarks/step.py --models transformer resnet: SGD, TENGraD and ASDL rows for both examples;
    ASDL's refusal of the Transformer is a row of the table, not an exception."""
    import step

    methods = ["sgd", "tengrad", "kfac"] if HAVE_ASDL else ["sgd", "tengrad"]
    assert step.main(["--models", "transformer", "resnet", "--clock", "cpu",
                      "--repeats", "1", "--warmup", "1", "--d-model", "8", "--width", "4",
                      "--model-batch", "8", "--methods", *methods]) == 0
    out = capsys.readouterr().out
    assert out.count("| TENGraD, empirical Fisher |") == 2
    assert "28 of 28 parameter tensors preconditioned" in out and "20 of 20 parameter" in out
    if HAVE_ASDL:
        assert "raised AssertionError: Not supported module: NonDynamicallyQuantizableLinear" in out
        assert "preconditions 18 of 28 tensors" in out and "preconditions 20 of 20 tensors" in out


def _cell(method, lr, damping, accs, diverged=""):
    return dict(method=method, hp=dict(lr=lr, damping=damping), best_acc=max(accs), diverged=diverged, seconds=1.0,
                points=[dict(epoch=i / 4, seconds=float(i), train_loss=1.0, test_loss=1.0, test_acc=a)
                        for i, a in enumerate(accs)])


def test_robustness_marks_collapse_and_merges_partial_runs(tmp_path, capsys):
    """A finite run ending at chance is 'collapsed' (not diverged); --merge takes a stopped run's
    partial.json and refuses a cell that two merged runs both hold."""
    import robustness

    ok, dead, div = _cell("tengrad", 0.1, 1.0, [0.1, 0.86]), _cell("tengrad", 0.1, 0.01, [0.118, 0.09]), \
        _cell("kfac", 0.1, 1.0, [0.118], diverged="step 3: non-finite loss")
    assert not robustness.collapsed(ok) and robustness.collapsed(dead) and not robustness.collapsed(div)
    assert robustness.cell_text(dead, 0.85) == "11.8 **c**" and robustness.cell_text(ok, 0.85) == "86.0 ✓"
    for name, cells in (("a", [ok, div]), ("b", [dead])):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "partial.json", "w") as f:
            json.dump(dict(results=cells), f)
    assert robustness.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "1/2 cells reach 85%, 0 diverged, 1 collapsed" in out and "0/1 cells reach 85%, 1 diverged" in out
    with open(tmp_path / "b" / "partial.json", "w") as f:
        json.dump(dict(results=[ok]), f)
    with pytest.raises(SystemExit, match="1 cells appear in more than one merged run"):
        robustness.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")])


def test_tta_truncate_reports_the_first_epochs_only():
    import tta

    run = _cell("sgd", 0.03, 0.0, [0.5, 0.86, 0.89, 0.91])
    cut = tta.truncate(run, 0.5)
    assert [p["test_acc"] for p in cut["points"]] == [0.5, 0.86, 0.89]
    assert cut["best_acc"] == 0.89 and cut["seconds"] == 2.0 and tta.truncate(run, None) is run


def test_tta_explore_quick_writes_every_variant(tmp_path):
    import tta_explore

    out = tmp_path / "x.json"
    variants = {"sgd": ["sgd", {"lr": 0.03}], "t": ["tengrad", {"update_freq": 2}], "bad": ["tengrad", {"lr": -1.0}]}
    assert tta_explore.main(["--quick", "--variants", json.dumps(variants), "--out", str(out)]) == 0
    with open(out) as f:
        runs = json.load(f)["runs"]
    assert sorted(runs) == ["bad", "sgd", "t"]
    assert runs["t"]["summary"]["steps"] == 8 and runs["t"]["clipped_frac"] is not None
    assert runs["bad"]["summary"]["diverged"].startswith("refused")
