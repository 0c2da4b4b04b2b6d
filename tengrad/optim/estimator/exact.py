"""The exact distributed step (distributed.py, steps 1-6): one process's step on the global batch.

``ExactEstimator.run`` runs on every rank with the same sequence of collectives; a rank that fails
keeps issuing them with zeros and the error is raised everywhere at the next status point. Each rank
builds its block rows R_r through curvature/build.py (the single-process rules, keeping x and gy
beside an explicit J), so this module only decides where rows or factors go: owners keep K and its
Cholesky factor (``Kept.gram/chol``); every rank keeps its own rows for J_r g and J_r^T u_r.

Under a prior the rows are put under it once the global gradient is in param.grad (distributed.py), from
x and gy on every rank (``Rows.factors_only``: the explicit J a rank's own batch size chose is set aside)
and with the largest rank's J against ``max_jacobian_numel``, so every rank takes the same D and the same
form: an explicit R' S^T goes to the owner as rows (``owners.rows_only``), Kronecker-scaled x and gy as
factors. One extra all-reduce of a failure flag follows (a rank whose rows failed would send another form).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from tengrad.optim.curvature import eigenbasis, paths, prior as prior_mod, woodbury
from tengrad.optim.curvature.block import Block
from tengrad.optim.curvature import build
from tengrad.optim.curvature.woodbury import Rows
from tengrad.optim.errors import TENGraDError
from tengrad.optim.estimator import owners as dplan
from tengrad.optim.estimator.base import Direction, StepInput
from tengrad.optim.estimator.comm import Failure, global_rank, pad0, raise_if_any, unpad_cat, world
from tengrad.optim.estimator.distributed import DistributedEstimator
from tengrad.optim.estimator.local import fallback_directions


@dataclass
class Kept:
    """What one block keeps between curvature steps ("exact"): rows here, the factor on the owner."""
    rows: Rows
    owner: int
    sizes: list[int]
    exchange: dplan.Exchange
    gram: Tensor | None       # owner only
    chol: Tensor | None       # owner only
    damping: float            # the a in chol (10x requested after a retry); owner only
    requested: float

    @property
    def row_sizes(self) -> list[int]:
        return [self.rows.reps * s for s in self.sizes]


class ExactEstimator(DistributedEstimator):
    """The global batch's exact step over the ranks (distributed.py, mode "exact")."""

    mode = "exact"

    def run(self, step: StepInput, skipped: dict[str, str]) -> list[Direction]:
        """Steps 1-6 of distributed.py on this rank: [(param, d, g, group)], identical on every rank."""
        rank, R = world(self.group)
        blocks = step.blocks
        grp = [step.group(b) for b in blocks]
        fail = Failure()
        recs, active, cur = self.records(step, fail, skipped)
        rows: dict[int, Rows] = {}
        m_r = 0
        try:
            for i, uses in recs.items():
                rows[i] = build.block_rows(blocks[i], uses, step.rules, step.check, keep_factors=True)
            m_r = self.batch_size([r.m for r in rows.values()])
            self.local_checks(step)
        except Exception as err:   # noqa: BLE001 - any error of this rank is raised on every rank (status)
            fail.record(err)
        sig = []
        for i in range(len(blocks)):
            r = rows.get(i)
            sig += [float(active[i]), 0.0 if r is None else float(r.x[0].numel()),
                    0.0 if r is None else float(r.gy[0].numel()), 0.0 if r is None else float(r.reps)]
        sizes = self.status(step, fail, m_r, sig)
        grads_of = self.gradients(step, m_r)
        prior, grads = step.rules.prior, None
        if prior is not None or step.moments is not None:
            # the prior's D and Adam's m read the global gradient (in param.grad, the same on every rank):
            # wait for it before the rows go under the prior (averaged.py)
            grads = grads_of()
            self.check_finite(step, grads)
            self.publish_gradients(step)
            if step.moments is not None:
                grads = {**grads, **step.moments()}
            for i in sorted(rows) if prior is not None else ():
                # one form on every rank: x and gy (the path a rank's batch size chose set aside), and the
                # largest rank's J against max_jacobian_numel, so every rank takes the same D and form
                b, r = blocks[i], rows[i]
                fits = r.reps * max(sizes) * b.numel <= step.rules.max_jacobian_numel
                try:
                    prior.decide(b, recs[i], r.m, sum(sizes))   # the global batch: every rank decides alike
                    rows[i] = prior.rows(r.factors_only(), b, step.rules.max_jacobian_numel if fits else 0)
                except Exception as err:   # noqa: BLE001 - raised on every rank below
                    fail.record(err)
            # a rank whose rows did not go under the prior would exchange another form: stop here, everywhere
            flag = torch.tensor([fail.flag], dtype=torch.float64, device=step.groups[0]["params"][0].device)
            dist.all_reduce(flag, group=self.group)
            self.traffic.add("(status)", "prior status all-reduce", flag)
            raise_if_any(float(flag) != 0.0, fail, self.group, step.steps)

        # plans and owners of the curvature blocks (identical on every rank: same sizes, same code)
        plans: dict[int, dplan.Exchange] = {}
        for i in rows:
            b, r = blocks[i], rows[i]
            if r.x is None:     # rows under a prior held as R S^T only: the owner gets them
                plans[i] = dplan.rows_only(r.reps, sizes, b.numel, prior_mod.rows_dtype(r).itemsize)
                continue
            key = ("exchange", tuple(sizes), tuple(r.x.shape[1:]), tuple(r.gy.shape[1:]), r.reps)
            if key not in b.choices:
                b.choices[key] = dplan.choose(b.plan, r.x.shape, r.gy.shape, r.x.element_size(),
                                              r.gy.element_size(), r.reps, sizes, b.numel,
                                              step.rules.max_jacobian_numel)
            plans[i] = b.choices[key]
        cur_ids = sorted(rows)
        owner_of = dict(zip(cur_ids, dplan.assign_owners([plans[i].owner_flops for i in cur_ids], R)))
        for i, b in enumerate(blocks):
            if active[i] and i not in owner_of:
                owner_of[i] = self.kept[b.name].owner

        # local rows: the explicit J_r when the owner gets rows (curvature/build.py formed it already
        # when it is cheaper for the products)
        for i in cur_ids:
            b = blocks[i]
            if plans[i].form == dplan.ROWS and not rows[i].explicit_held:
                try:
                    b.choice = paths.PathChoice(paths.JACOBIAN, f"J_r formed: the owner gets rows ({b.choice.note})")
                    rows[i] = rows[i].explicit(b.plan)
                except Exception as err:   # noqa: BLE001 - raised on every rank at the final status
                    fail.record(err)

        # 3. curvature payloads to the owners (async)
        works: dict[int, list] = {i: [] for i in range(len(blocks))}   # per block, this rank's handles
        gathered: dict[int, list[list[Tensor] | None]] = {}
        for i in cur_ids:
            b, r, ex, owner = blocks[i], rows[i], plans[i], owner_of[i]
            m_max, rows_max = max(sizes), r.reps * max(sizes)
            if ex.form == dplan.FACTORS:
                payload = [pad0(r.x, m_max), pad0(r.gy, rows_max)]
            else:
                jac = r.matrix() if r.explicit_held else r.gy.new_zeros(r.n_rows, b.numel)
                payload = [pad0(jac, rows_max)]
            lists = [[torch.empty_like(t) for _ in range(R)] if rank == owner else None for t in payload]
            for t, lst in zip(payload, lists):
                dst = global_rank(self.group, owner)
                works[i].append(dist.gather(t, gather_list=lst, dst=dst, group=self.group, async_op=True))
                self.traffic.add(b.name, f"{ex.form} gather", t)
            gathered[i] = lists

        if grads is None:
            grads = grads_of()
            try:
                self.check_finite(step, grads)
            except TENGraDError:
                for w in (w for ws in works.values() for w in ws):
                    w.wait()
                raise
        # what the solve takes per block: g, or g' = S g for rows R S^T under a prior (woodbury.direction)
        into: dict[int, list[Tensor]] = {}
        for i in (i for i in range(len(blocks)) if active[i]):
            r = rows[i] if i in rows else self.kept[blocks[i].name].rows
            like = [grads[id(p)] for p in blocks[i].params]
            into[i] = like if r.prior is None else eigenbasis.into(r.prior, like)

        # 4. J_r g to the owners (async)
        order = [i for i in range(len(blocks)) if active[i]]
        jg_lists: dict[int, list[Tensor] | None] = {}
        for i in order:
            b = blocks[i]
            r = rows[i] if i in rows else self.kept[b.name].rows
            row_sizes = [r.reps * s for s in (sizes if i in rows else self.kept[b.name].sizes)]
            try:
                jg = r.jg(b.plan, into[i])
            except Exception as err:   # noqa: BLE001 - raised on every rank at the final status
                fail.record(err)
                jg = into[i][0].new_zeros(r.n_rows)
            t = pad0(jg, max(row_sizes))
            lst = [torch.empty_like(t) for _ in range(R)] if rank == owner_of[i] else None
            dst = global_rank(self.group, owner_of[i])
            works[i].append(dist.gather(t, gather_list=lst, dst=dst, group=self.group, async_op=True))
            self.traffic.add(b.name, "J g gather", t)
            jg_lists[i] = lst

        # 5. owners solve, in block order, and broadcast [u, a used, failed] (async)
        bcasts: dict[int, tuple] = {}
        for i in order:
            b = blocks[i]
            kept = self.kept.get(b.name)
            r = rows[i] if i in rows else kept.rows
            bsizes = sizes if i in rows else kept.sizes
            row_sizes = [r.reps * s for s in bsizes]
            n = sum(row_sizes)
            buf = into[i][0].new_zeros(n + 2) if r.gy is None else r.gy.new_zeros(n + 2)
            if rank == owner_of[i]:
                try:
                    for w in works[i]:    # this block's payloads and J g (launched by every rank)
                        w.wait()
                    a = grp[i]["damping"]
                    gram, chol, used = _owner_factor(b, r, plans.get(i), gathered.get(i), kept, bsizes, a)
                    jg_all = unpad_cat(jg_lists[i], row_sizes)
                    u = torch.cholesky_solve(jg_all.reshape(-1, 1).to(chol.dtype), chol).reshape(-1)
                    buf[:n] = u
                    buf[n] = used
                    self.pending[b.name] = Kept(r, owner_of[i], list(bsizes),
                                                 plans[i] if i in plans else kept.exchange, gram, chol, used, a)
                except Exception as err:   # noqa: BLE001 - raised on every rank at the final status
                    fail.record(err)
                    buf.zero_()
                    buf[n + 1] = 1.0
                self.traffic.add(b.name, "u broadcast", buf)
            elif i in rows:
                self.pending[b.name] = Kept(r, owner_of[i], list(bsizes), plans[i], None, None, 0.0,
                                           grp[i]["damping"])
            src = global_rank(self.group, owner_of[i])
            bcasts[i] = (dist.broadcast(buf, src=src, group=self.group, async_op=True), buf)

        # 6. J^T u = sum_r J_r^T u_r with a status element, one all-reduce
        backs, used = [], {}
        for i in order:
            b = blocks[i]
            work, buf = bcasts[i]
            work.wait()
            r = rows[i] if i in rows else self.kept[b.name].rows
            bsizes = sizes if i in rows else self.kept[b.name].sizes
            row_sizes = [r.reps * s for s in bsizes]
            n, off = sum(row_sizes), sum(row_sizes[:rank])
            used[i] = float(buf[n])
            like = into[i]
            back = None
            if float(buf[n + 1]) == 0.0 and fail.error is None:
                try:
                    back = torch.cat([t.reshape(-1).to(g.dtype) for t, g in
                                      zip(r.jtu(b.plan, buf[off:off + row_sizes[rank]], like), like)])
                except Exception as err:   # noqa: BLE001 - raised on every rank at the final status
                    fail.record(err)
            if back is None:
                back = torch.zeros(sum(t.numel() for t in like), dtype=like[0].dtype, device=like[0].device)
            backs.append(back)
        flags = [float(buf[-1]) for _, buf in bcasts.values()]
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in backs) else torch.float32
        device = step.groups[0]["params"][0].device
        flat = torch.cat([t.to(dtype) for t in backs]
                         + [torch.tensor([fail.flag + sum(flags)], dtype=dtype, device=device)])
        dist.all_reduce(flat, group=self.group)
        self.traffic.add("(all blocks)", "J^T u all-reduce", flat)
        for w in (w for ws in works.values() for w in ws):
            w.wait()
        raise_if_any(float(flat[-1]) != 0.0, fail, self.group, step.steps)

        out, start, per_block = [], 0, []
        for i in order:
            b = blocks[i]
            r = rows[i] if i in rows else self.kept[b.name].rows
            ds = []
            for g in into[i]:
                back = flat[start:start + g.numel()].reshape(g.shape).to(g.dtype)
                start += g.numel()
                ds.append((g - back) / used[i])
            if r.prior is not None:            # d = S^T d'
                eigenbasis.out_of_(r.prior, ds)
            per_block.append((i, ds, r))
        if step.adam_scale:    # step_rule="adam": Adam's scale outside the rows, each block's d clipped
            prior_mod.scale_clip_([ds for _, ds, _ in per_block],
                                  [prior_mod.adam_scale(used[i], r.prior_mean) for i, _, r in per_block])
        for i, ds, _ in per_block:
            b = blocks[i]
            for p, d in zip(b.params, ds):
                if not torch.isfinite(d).all():
                    raise TENGraDError(f"layer {b.name!r}: the preconditioned direction has non-finite entries")
                if p.grad is not None:
                    out.append((p, d, grads[id(p)], grp[i]))
        return out + fallback_directions(step, grads)

    def mode_lines(self) -> list[str]:
        return []

    def block_line(self, b: Block, last: str) -> str:
        k = self.kept.get(b.name)
        if isinstance(k, Kept):
            ex = k.exchange
            return (f"    {b.name}: owner rank {k.owner}; curvature steps exchange {ex.form} "
                    f"({ex.bytes_factors} B factors vs {ex.bytes_rows} B rows per rank); last step sent {last}")
        return f"    {b.name}: last step sent {last}"


def _owner_factor(b, r: Rows, ex, lists, kept: Kept | None, sizes, a):
    """(K, L, a used) on the owner: from the gathered payloads, or the kept factor (redamped)."""
    M = sum(sizes)
    if lists is None:   # reuse step: the kept factor, refactored if the damping changed
        if kept.requested == a:
            return kept.gram, kept.chol, kept.damping
        chol, used = woodbury.factor(kept.gram, M, a, b.name)
        return kept.gram, chol, used
    if ex.form == dplan.FACTORS:
        xs = [p[:s] for p, s in zip(lists[0], sizes)]
        gys = [p[:r.reps * s] for p, s in zip(lists[1], sizes)]
        x_rep = torch.cat([x if r.reps == 1 else
                           x.unsqueeze(0).expand(r.reps, *x.shape).reshape(r.reps * x.shape[0], *x.shape[1:])
                           for x in xs])
        gram = b.plan.gram(x_rep, torch.cat(gys))
    else:
        jac = unpad_cat(lists[0], [r.reps * s for s in sizes])
        gram = jac @ jac.T
    chol, used = woodbury.factor(gram, M, a, b.name)
    return gram, chol, used
