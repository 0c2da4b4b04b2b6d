"""The "local" distributed step: own-batch curvature, the directions averaged (an approximation).

d = (1/R) sum_r (F_r + a I)^-1 g with F_r = J_r^T J_r / m_r (the single-process curvature of rank r's
batch, kept for update_freq steps like the single-process optimizer's) and g the global gradient.
One all-reduce of the directions (plus a status element) gives every rank the same bits.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from tengrad.optim import woodbury
from tengrad.optim.distributed_comm import Failure, raise_if_any, world


def local_directions(st, opt, grp: list[dict], where: dict[int, int], skipped: dict[str, str]):
    """[(param, d, g, group)], identical on every rank (distributed.py, mode "local")."""
    _, R = world(st.group)
    blocks = opt.blocks
    fail = Failure()
    recs, active, cur = st.records(opt, fail, skipped)
    curv: dict[int, woodbury.BlockCurvature] = {}
    m_r = 0
    try:
        for i, b in enumerate(blocks):
            a = grp[i]["damping"]
            if not active[i]:
                continue
            if cur[i]:
                curv[i] = opt._curvature(b, a, recs[i])
            else:
                kept = st.kept[b.name]
                curv[i] = kept if kept.requested == a else woodbury.redamp(kept, a, b.name)
        m_r = st.batch_size([curv[i].m for i in recs if i in curv])
        st.local_checks(opt)
    except Exception as err:   # noqa: BLE001
        fail.record(err)
    sig = []
    for i in range(len(blocks)):
        sig += [float(active[i]), 0.0, 0.0, 0.0]
    st.status(opt, fail, m_r, sig)
    grads = st.gradients(opt, m_r, where)()
    st.check_finite(opt, grads)
    order = [i for i in range(len(blocks)) if active[i]]
    ds = []
    for i in order:
        b = blocks[i]
        like = [grads[id(p)] for p in b.params]
        d = None
        if fail.error is None:
            try:
                d = woodbury.direction(curv[i], b.plan, like, b.name)
            except Exception as err:   # noqa: BLE001
                fail.record(err)
        ds += [t.reshape(-1) for t in d] if d is not None else [t.new_zeros(t.numel()) for t in like]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in ds) else torch.float32
    device = opt.param_groups[0]["params"][0].device
    flat = torch.cat([t.to(dtype) for t in ds] + [torch.tensor([fail.flag], dtype=dtype, device=device)])
    dist.all_reduce(flat, group=st.group)
    st.traffic.add("(all blocks)", "direction all-reduce", flat)
    raise_if_any(float(flat[-1]) != 0.0, fail, st.group, opt._steps)
    flat = flat / R
    out, start = [], 0
    for i in order:
        b = blocks[i]
        for p in b.params:
            g = grads[id(p)]
            d = flat[start:start + g.numel()].reshape(g.shape).to(g.dtype)
            start += g.numel()
            if p.grad is not None:
                out.append((p, d, g, grp[i]))
        st._pending[b.name] = curv[i]
    return out + st.fallback_directions(opt, grads, where)
