"""The verdict of benchmarks/tta_report.py against issue 24's acceptance, on hand-made runs: the ratio of
TENGraD's time to the target over the fastest peer's per seed and its median; a peer that never reached
the target counts as infinitely slow; a seed with no peer at all gives no ratio (a run of TENGraD alone
is no verdict, not a win)."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from tta_report import Spec, verdict  # noqa: E402

META = dict(metric="test_acc", higher_is_better=True, targets=[0.9, 0.92], title="t",
            acceptance=dict(target=0.92, ratio=0.7, peers=["sgd", "adamw"]))


def _run(method, seed, reached_at):
    """A run whose accuracy first reaches 92% at ``reached_at`` seconds (None: never; 91% at most)."""
    pts = [dict(step=0, seconds=0.0, test_acc=0.1)]
    pts += [dict(step=10, seconds=50.0, test_acc=0.91)]
    if reached_at is not None:
        pts += [dict(step=20, seconds=float(reached_at), test_acc=0.925)]
    return dict(method=method, seed=seed, points=pts)


def test_ratio_per_seed_and_median():
    runs = [_run("tengrad", 0, 60), _run("sgd", 0, 100), _run("adamw", 0, 80),
            _run("tengrad", 1, 90), _run("sgd", 1, 100), _run("adamw", 1, None)]
    out = verdict(Spec(META), runs)
    assert "per seed [0.75, 0.90], median 0.82 (acceptance <= 0.7: missed)" in out, out


def test_peers_that_never_reach_the_target_count_as_a_win():
    runs = [_run("tengrad", 0, 60), _run("sgd", 0, None), _run("adamw", 0, None)]
    assert "[peers never], median 0.00 (acceptance <= 0.7: met)" in verdict(Spec(META), runs)


def test_tengrad_alone_gives_no_verdict():
    out = verdict(Spec(META), [_run("tengrad-prior", 1, 60)])
    assert "no peer of sgd/adamw ran beside it: no verdict" in out, out
    assert "met" not in out


def test_the_final_metric_counts_every_peer_and_every_tengrad_arm():
    """The time ratio is against the acceptance peers only (AdamW on the LM task), but the final metric
    is against the best of every peer that ran (SOAP there), for each TENGraD arm."""
    runs = [_run("tengrad-prior", 0, 60), _run("adamw", 0, 100), _run("soap", 0, 40)]
    runs[2]["points"].append(dict(step=30, seconds=90.0, test_acc=0.95))      # SOAP ends higher
    out = verdict(Spec(META), runs)
    assert "per seed [0.60], median 0.60 (acceptance <= 0.7: met)" in out, out
    assert "best test_acc: TENGraD (prior='adam') 92.50% vs the best peer, SOAP, 95.00% (medians): worse" in out, out


def test_a_prior_arm_run_with_another_prior_is_labelled_by_it():
    """``--hp 'tengrad-prior={"prior": "soap"}'`` runs the eigenbasis prior in the "adam" arm's slot:
    the verdict names the prior it ran with, not the arm's default."""
    runs = [_run("tengrad-prior", 0, 60), _run("adamw", 0, 100), _run("tengrad-soap", 0, 70)]
    runs[0]["hp"] = {"prior": "soap", "kl_clip": 0.0256}
    out = verdict(Spec(META), runs)
    assert "TENGraD (prior='soap', as tengrad-prior): time to" in out, out
    assert "TENGraD (prior='adam')" not in out, out
    assert out.count("TENGraD (prior='soap')") == 2, out     # the tengrad-soap arm: time line, final metric


def test_an_arm_with_another_step_rule_names_it():
    import peers
    assert peers.label("tengrad-soap", {"step_rule": "adam", "lr": 3e-3}) == "TENGraD (prior='soap', step_rule='adam')"
    assert peers.label("tengrad-soap", {"lr": 1.0}) == "TENGraD (prior='soap')"
