"""Kept direction buffers (curvature/scratch.py): the step written into a buffer reused every step
is the dense float64 oracle's step, and no momentum buffer is ever the kept buffer.

``scratch.MIN_NUMEL`` is lowered to 1 so the small test models' every parameter gets a buffer (the
default gives one only to parameters of 2^20 elements and more), and ``stacked.SMALL`` to 0 so that no
block is stepped in a stack instead (stacked.py); d is always formed (no update.Deferred: that path has
tests/test_optim_deferred.py)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from tengrad.optim import TENGraD
from tengrad.optim.curvature import scratch, stacked
from tengrad.optim.estimator import local

from support.optim_cases import make_batch, make_model
from support.step_oracle import run_against_oracle


@pytest.fixture
def every_parameter(monkeypatch):
    monkeypatch.setattr(scratch, "MIN_NUMEL", 1)
    monkeypatch.setattr(stacked, "SMALL", 0)         # no block is stepped in a stack (stacked.py)
    monkeypatch.setattr(local, "_deferrable", lambda *a: False)   # d formed (not update.Deferred)


@pytest.mark.parametrize("kind", ["mlp", "conv", "token"])
@pytest.mark.parametrize("k", [1, 3])
def test_steps_through_kept_buffers_match_the_oracle(every_parameter, kind, k):
    opt = run_against_oracle(kind, "empirical", "cross_entropy", k, [6, 6, 5, 6])
    assert opt.estimator._scratch.nbytes() > 0       # the buffers were used


def _run(kind, steps, **kw):
    """``steps`` seeded steps of TENGraD (lr 0.1, damping 0.5, update_freq 2; momentum 0.9 and no KL clip
    unless ``kw`` says otherwise) on a fresh ``kind`` model; (model, optimizer)."""
    model = make_model(kind)
    gen = torch.Generator().manual_seed(3)
    kw = {"momentum": 0.9, "kl_clip": None, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, 0.1, 0.5, update_freq=2, **{"prior": None, "step_rule": "natural", **kw})
    for _ in range(steps):
        x, y = make_batch(kind, 6, "cross_entropy", gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_momentum_never_adopts_a_kept_buffer(monkeypatch, kind):
    want, _ = _run(kind, 5)                           # no buffers (small parameters)
    monkeypatch.setattr(scratch, "MIN_NUMEL", 1)
    monkeypatch.setattr(stacked, "SMALL", 0)
    monkeypatch.setattr(local, "_deferrable", lambda *a: False)
    got, opt = _run(kind, 5)
    bufs = [b.data_ptr() for b in opt.estimator._scratch.tensors()]
    assert bufs
    for p in got.parameters():
        assert opt.state[p]["momentum_buffer"].data_ptr() not in bufs
    for a, b in zip(want.parameters(), got.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
