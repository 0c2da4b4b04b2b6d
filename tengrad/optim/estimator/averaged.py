"""The "local" distributed step: own-batch curvature, the directions averaged (an approximation).

d = (1/R) sum_r (F_r + a I)^-1 g with F_r = J_r^T J_r / m_r (the single-process curvature of rank r's
batch, built through curvature/build.py like the single-process estimator's and kept for update_freq
steps) and g the global gradient. One all-reduce of the directions (plus a status element) gives
every rank the same bits.

Under a prior (``prior="adam"`` / ``"soap"``, curvature/prior.py) d = (1/R) sum_r (F_r + a D)^-1 g with one
D on every rank: after the status exchange the global gradient is written into param.grad
(``publish_gradients``; the local checks have compared this rank's rows with its own gradient by then),
so the prior's second moments and factors, updated from param.grad after the step, and the D taken from
them at a curvature step are the same bits everywhere; rank r's rows become R_r S^T after that. Under
step_rule="adam" the solve takes Adam's bias-corrected m of the global gradient (``StepInput.moments``,
called once it is in param.grad) in place of g, and each rank's d_r is scaled and clipped per block
(prior.adam_scale, prior.scale_clip_) before the average, as the single-process step does.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from tengrad.optim.curvature import build, prior as prior_mod, woodbury
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
        prior = step.rules.prior
        fail = Failure()
        recs, active, cur = self.records(step, fail, skipped)
        rows: dict[int, woodbury.Rows] = {}
        curv: dict[int, woodbury.BlockCurvature] = {}
        m_r = 0
        try:
            for i, b in enumerate(blocks):
                if active[i] and cur[i]:
                    rows[i] = build.block_rows(b, recs[i], step.rules, step.check)
            m_r = self.batch_size([r.m for r in rows.values()])
            self.local_checks(step)
        except Exception as err:   # noqa: BLE001 - any error of this rank is raised on every rank (status)
            fail.record(err)
        sig = []
        for i in range(len(blocks)):
            sig += [float(active[i]), 0.0, 0.0, 0.0]
        sizes = self.status(step, fail, m_r, sig)
        grads = self.gradients(step, m_r)()
        self.check_finite(step, grads)
        if prior is not None or step.moments is not None:
            # the prior's v and Adam's m read param.grad: the global gradient, the same on every rank
            self.publish_gradients(step)
        if step.moments is not None:       # step_rule="adam": the solve preconditions Adam's m
            grads = {**grads, **step.moments()}
        order = [i for i in range(len(blocks)) if active[i]]
        ds, clipped, clip_scales = [], [], []
        for i in order:
            b = blocks[i]
            like = [grads[id(p)] for p in b.params]
            d = None
            if fail.error is None:
                try:
                    curv[i] = self._curvature(b, rows.get(i), recs.get(i, []), grp[i]["damping"], prior, step,
                                              sum(sizes))
                    d = woodbury.direction(curv[i], b.plan, like, b.name)
                except Exception as err:   # noqa: BLE001 - raised on every rank after the all-reduce
                    fail.record(err)
            if d is not None and step.adam_scale:   # step_rule="adam": Adam's scale outside the rows, clipped
                clipped.append(d)
                clip_scales.append(prior_mod.adam_scale(curv[i].damping, curv[i].rows.prior_mean))
            ds.append(d if d is not None else [t.new_zeros(t.shape) for t in like])
        prior_mod.scale_clip_(clipped, clip_scales)
        flat_ds = [t.reshape(-1) for d in ds for t in d]
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in flat_ds) else torch.float32
        device = step.groups[0]["params"][0].device
        flat = torch.cat([t.to(dtype) for t in flat_ds] + [torch.tensor([fail.flag], dtype=dtype, device=device)])
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

    def _curvature(self, b, rows, uses, damping: float, prior, step: StepInput, total: int) -> woodbury.BlockCurvature:
        """Block b's curvature this step: from this step's rows (under the prior: R' = R S^T, prior.py; which
        weights rotate decided on the global batch of ``total`` samples, alike on every rank), else the
        kept one (refactored when its damping changed)."""
        if rows is not None:
            if prior is not None:
                prior.decide(b, uses, rows.m, total)
                rows = prior.rows(rows, b, step.rules.max_jacobian_numel)
            return woodbury.curvature(rows, b.plan, damping, b.name)
        kept = self.kept[b.name]
        return kept if kept.requested == damping else woodbury.redamp(kept, damping, b.name)
