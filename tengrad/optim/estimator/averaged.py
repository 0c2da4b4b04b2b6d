"""The "local" distributed step: own-batch curvature, the directions averaged (an approximation).

d = (1/R) sum_r (F_r + a I)^-1 g with F_r = J_r^T J_r / m_r (the single-process curvature of rank r's
batch, built through curvature/build.py like the single-process estimator's and kept for update_freq
steps) and g the global gradient. One all-reduce of the directions (plus a status element) gives
every rank the same bits.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from tengrad.optim.curvature import woodbury
from tengrad.optim.curvature import build
from tengrad.optim.estimator.base import Direction, StepInput
from tengrad.optim.estimator.comm import Failure, raise_if_any, world
from tengrad.optim.estimator.distributed import DistributedEstimator
from tengrad.optim.estimator.local import fallback_directions


class AveragedEstimator(DistributedEstimator):
    mode = "local"

    def mode_lines(self) -> list[str]:
        return ["    approximation: each rank preconditions with its own batch's curvature, "
                "directions averaged in one all-reduce"]

    def run(self, step: StepInput, skipped: dict[str, str]) -> list[Direction]:
        """[(param, d, g, group)], identical on every rank."""
        _, R = world(self.group)
        blocks = step.blocks
        grp = [step.group(b) for b in blocks]
        fail = Failure()
        recs, active, cur = self.records(step, fail, skipped)
        curv: dict[int, woodbury.BlockCurvature] = {}
        m_r = 0
        try:
            for i, b in enumerate(blocks):
                a = grp[i]["damping"]
                if not active[i]:
                    continue
                if cur[i]:
                    curv[i] = woodbury.curvature(build.block_rows(b, recs[i], step.rules, step.check), b.plan, a, b.name)
                else:
                    kept = self.kept[b.name]
                    curv[i] = kept if kept.requested == a else woodbury.redamp(kept, a, b.name)
            m_r = self.batch_size([curv[i].m for i in recs if i in curv])
            self.local_checks(step)
        except Exception as err:   # noqa: BLE001 - any error of this rank is raised on every rank (status)
            fail.record(err)
        sig = []
        for i in range(len(blocks)):
            sig += [float(active[i]), 0.0, 0.0, 0.0]
        self.status(step, fail, m_r, sig)
        grads = self.gradients(step, m_r)()
        self.check_finite(step, grads)
        order = [i for i in range(len(blocks)) if active[i]]
        ds = []
        for i in order:
            b = blocks[i]
            like = [grads[id(p)] for p in b.params]
            d = None
            if fail.error is None:
                try:
                    d = woodbury.direction(curv[i], b.plan, like, b.name)
                except Exception as err:   # noqa: BLE001 - raised on every rank after the all-reduce
                    fail.record(err)
            ds += [t.reshape(-1) for t in d] if d is not None else [t.new_zeros(t.numel()) for t in like]
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in ds) else torch.float32
        device = step.groups[0]["params"][0].device
        flat = torch.cat([t.to(dtype) for t in ds] + [torch.tensor([fail.flag], dtype=dtype, device=device)])
        dist.all_reduce(flat, group=self.group)
        self.traffic.add("(all blocks)", "direction all-reduce", flat)
        raise_if_any(float(flat[-1]) != 0.0, fail, self.group, step.steps)
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
            self.pending[b.name] = curv[i]
        return out + fallback_directions(step, grads)
