"""Smoke tests for ``tengrad demo`` on scikit-learn's digits (CI needs no Fashion-MNIST)."""
import csv
import math

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

import tengrad.demo as demo  # noqa: E402

TINY = ["--width", "4", "--hidden", "16", "--train-subset", "256", "--test-subset", "64",
        "--batch-size", "64", "--no-progress", "--threads", "1"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_demo_digits_writes_csv_and_png(tmp_path, capsys):
    assert demo.main(["--dataset", "digits", "--epochs", "2", *TINY, "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "results.csv")
    assert rows and list(rows[0]) == ["optimizer", "epoch", "wall_time_s", "train_loss", "test_accuracy"]
    by_opt = {}
    for r in rows:
        by_opt.setdefault(r["optimizer"], []).append(r)
    assert sorted(by_opt) == ["SGD", "TENGraD"]
    for recs in by_opt.values():
        assert [float(r["epoch"]) for r in recs] == [0, 0.5, 1, 1.5, 2]  # 2 evaluations per epoch
        assert all(math.isfinite(float(r["train_loss"])) for r in recs)
        assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in recs)
        times = [float(r["wall_time_s"]) for r in recs]
        assert times[0] == 0.0 and times == sorted(times)
    assert (tmp_path / "curves.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "digits" in out and "| optimizer" in out


def test_demo_missing_fashion_mnist_falls_back(tmp_path, capsys):
    argv = ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "nowhere"), "--epochs", "1",
            "--optimizers", "sgd", *TINY, "--out", str(tmp_path / "out")]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "apt-get install dataset-fashion-mnist" in out
    assert len(_rows(tmp_path / "out" / "results.csv")) == 3
