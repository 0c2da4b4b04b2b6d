"""TENGraD against the dense oracle (support/step_oracle.py): each step equals -lr (F_b + a I)^-1 g_b per
block, in float64, for the conv and token models, every Fisher (empirical, mc, exact) and loss, with
update_freq 1 and 3 (steps 2..k use the fresh gradient with the Fisher of the stored first batch), on the
path the cost model picks and on the reuse path; mc labels are reproducible from the generator.
"""
from __future__ import annotations

import pytest
import torch

from support.optim_cases import make_batch, make_model
from support.step_oracle import run_against_oracle
from tengrad.optim import TENGraD

CASES = [(kind, fisher, loss) for kind in ("conv", "tokens") for fisher in ("empirical", "mc", "exact")
         for loss in ("cross_entropy", "mse")]


@pytest.mark.parametrize("kind,fisher,loss", CASES, ids=["-".join(c) for c in CASES])
def test_one_step_matches_dense_oracle(kind, fisher, loss):
    run_against_oracle(kind, fisher, loss, k=1, sizes=[5, 3])


# every case on the path the cost model picks, and the cross_entropy cases again on the reuse path
FREQ_CASES = [c + ("auto",) for c in CASES] + [c + ("reuse",) for c in CASES if c[2] == "cross_entropy"]


@pytest.mark.parametrize("kind,fisher,loss,path", FREQ_CASES, ids=["-".join(c) for c in FREQ_CASES])
def test_update_freq_reuses_stored_batch(kind, fisher, loss, path):
    # steps 2..3 use the Fisher of step 1's batch; batch sizes change, and m = 1 is a curvature step.
    # path "reuse" forbids explicit Jacobians (memory cap 0), so x/gy and plan.jvp/vjp are exercised.
    extra = {"max_jacobian_numel": 0} if path == "reuse" else {}
    opt = run_against_oracle(kind, fisher, loss, k=3, sizes=[4, 6, 1, 1, 3], **extra)
    assert all(b.curv is not None for b in opt.blocks)
    if path == "reuse":
        assert all(b.choice.path == "reuse" for b in opt.blocks)


def test_mc_labels_are_reproducible():
    def labels(seed):
        model = make_model("tokens")
        opt = TENGraD(model, 0.1, 0.5, fisher="mc", generator=torch.Generator().manual_seed(seed), prior=None)
        x, y = make_batch("tokens", 8, "cross_entropy", torch.Generator().manual_seed(0))
        opt.backward(model(x), y, loss="cross_entropy")
        return opt.last_labels

    assert torch.equal(labels(3), labels(3))
    assert not torch.equal(labels(3), labels(4))
