"""Snapshots for the bad-input tests: parameters, momentum buffers and kept curvature, compared bit for bit."""
from __future__ import annotations

import torch


def snapshot_all(model, opt) -> dict:
    """Clones of everything a refused call must leave untouched."""
    curv = {}
    for b in opt.blocks:
        if b.curv is not None:
            curv[b.name] = (b.curv, {k: None if v is None else v.clone() for k, v in b.curv.tensors().items()})
        else:
            curv[b.name] = (None, {})
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
                    for p, s in opt.state.items()},
        "curv": curv,
        "steps": opt._steps,
        "groups": repr([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
    }


def assert_unchanged(model, opt, snap: dict) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), snap["params"][n]), f"parameter {n} changed"
    now = {id(p): s for p, s in opt.state.items()}
    assert set(now) == set(snap["buffers"]), "momentum state gained or lost entries"
    for key, bufs in snap["buffers"].items():
        for k, v in bufs.items():
            assert now[key][k].shape == v.shape and torch.equal(now[key][k], v), f"state {k} changed"
    for b in opt.blocks:
        obj, tensors = snap["curv"][b.name]
        assert b.curv is obj, f"curvature of {b.name} replaced"
        for k, v in tensors.items():
            got = b.curv.tensors()[k]
            assert (got is None and v is None) or torch.equal(got, v), f"curvature {b.name}.{k} changed"
    assert opt._steps == snap["steps"]
    assert repr([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]) == snap["groups"]
