"""Data-parallel TENGraD on torch.distributed: the exact global-batch step, spread over the ranks.

R ranks, rank r with m_r samples, global batch M = sum_r m_r. Per block, with the global gradient g
(distributed_grad.py) and J = [J_1; ...; J_R] the ranks' rows stacked (DESIGN.md):

    d = (1/a) (g - J^T (K + M a I)^-1 J g),     K = J J^T  [M_rows, M_rows]

``mode="exact"`` computes exactly that, i.e. the step of one process on the concatenated batch:

1. status: one all-gather of [failed, m_r, per block (active, |x_i|, |gy_i|, reps)]; any local error
   (capture, non-finite gradient, missing forward) makes every rank raise the same error here.
2. gradient: one all-reduce of [m_r g_r, m_r] (plain model), or nothing (DDP: its comm hook did it).
3. curvature steps: each block's factors or rows (distributed_plan.py) are gathered to its owner
   (async, launched for every block before any is waited on).
4. J g is local: J_r g with the global g, gathered to the owner (async).
5. the owner factors K + M a I (woodbury.factor: one retry with 10 a) and broadcasts
   [u = (K + M a I)^-1 J g, a used, failed] (async; owners work through their blocks in block order,
   so ranks owning different blocks compute at the same time).
6. J^T u = sum_r J_r^T u_r: one all-reduce of every block's J_r^T u_r plus a status element; an
   owner's failure (non-finite K, failed Cholesky) makes every rank raise the same error here.
   Every rank then has the same bits of d: no direction is broadcast.
Reuse steps (update_freq k) skip 1's capture and 3: the factor stays on the owner, the rows stay on
their ranks, and a step costs 4-6 only. The commit (parameters, momentum, kept curvature) happens only
after 6 succeeded on every rank, so parameters stay identical on all ranks.

``mode="local"``: every rank preconditions the global g with its *own* batch's curvature
(F_r = J_r^T J_r / m_r, the single-process step on its m_r samples) and the directions are averaged,
d = (1/R) sum_r (F_r + a I)^-1 g, in one all-reduce (with a status element). This is an approximation
of the global step (it is not (F + a I)^-1 g), cheaper in bytes and with no owner; parameters stay
bit-identical because the all-reduce hands every rank the same sum.

Checkpoints: ``state_dict`` keeps parameters, momentum and the step count (identical on every rank)
but no distributed curvature; after ``load_state_dict`` the next step is a curvature step on every rank
(the owners' factors are recomputed from that step's batch). Each rank keeps its own Monte-Carlo
generator (rank 0's would make every rank draw the same labels).

NCCL: the collectives used (all_gather, all_reduce, gather, broadcast, async handles) exist for NCCL,
but only gloo on CPU is tested here; NCCL needs the tensors on the rank's CUDA device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tengrad.optim import distributed_plan as dplan
from tengrad.optim import paths, woodbury
from tengrad.optim.distributed_comm import Failure, Traffic, pad0, raise_if_any, unpad_cat, world
from tengrad.optim.distributed_grad import (BatchSize, install_ddp_hook, is_ddp, reduce_gradients,
                                            split_gradients)
from tengrad.optim.distributed_rows import Rows, take_rows
from tengrad.optim.errors import TENGraDError

MODES = ("exact", "local")


def resolve(distributed, model: nn.Module):
    """The strategy for ``TENGraD(..., distributed=...)``, or None for a single-process optimizer.

    "auto" (the default): "exact" inside an initialised process group of more than one rank, else off.
    "exact"/"local": need an initialised group. None/"off": never distributed.
    """
    if distributed in (None, False, "off"):
        return None
    if distributed not in ("auto",) + MODES:
        raise TENGraDError(f"distributed must be 'auto', 'exact', 'local' or None, got {distributed!r}")
    ready = dist.is_available() and dist.is_initialized()
    if distributed == "auto":
        if not ready or dist.get_world_size() == 1:
            return None
        distributed = "exact"
    elif not ready:
        raise TENGraDError(f"distributed={distributed!r} needs an initialised torch.distributed process "
                           "group (torch.distributed.init_process_group, e.g. under torchrun)")
    return Strategy(distributed, model)


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


class Strategy:
    """The distributed part of ``TENGraD.step``: ``directions`` (all ranks raise or none), ``commit``."""

    def __init__(self, mode: str, model: nn.Module, group=None) -> None:
        self.mode = mode
        self.group = group
        self.ddp = is_ddp(model)
        self.batch = BatchSize(model)
        if self.ddp:
            install_ddp_hook(model, self.batch, group)
        self.kept: dict[str, object] = {}     # block name -> Kept ("exact") or BlockCurvature ("local")
        self._pending: dict[str, object] = {}
        self.traffic = Traffic()              # this rank's bytes in the last step
        self.bytes_sent = 0                   # ... and since construction
        self.steps_seen = 0

    # ------------------------------------------------------------------ seams called by TENGraD
    def curvature_due(self, opt) -> bool:
        return opt._steps % opt.update_freq == 0 or any(b.name not in self.kept for b in opt.blocks)

    def reset(self) -> None:
        """Forget the kept curvature (after load_state_dict): the next step recomputes it everywhere."""
        self.kept.clear()
        self._pending.clear()

    def commit(self) -> None:
        self.kept.update(self._pending)
        self._pending = {}

    def directions(self, opt, a: float, wd: float) -> list[tuple[Tensor, Tensor, Tensor]]:
        self.traffic.reset()
        self._pending = {}
        try:
            return self._exact(opt, a, wd) if self.mode == "exact" else self._local(opt, a, wd)
        finally:
            self.batch.next_step()
            self.bytes_sent += self.traffic.total
            self.steps_seen += 1

    def _batch_size(self, ms: list[int]) -> int:
        """m_r: the captured layers' batch on curvature steps (they must agree), else the model's."""
        if ms:
            if len(set(ms)) > 1:
                raise TENGraDError(f"the captured layers saw different batch sizes {sorted(set(ms))}")
            return ms[0]
        return self.batch.get()

    # ------------------------------------------------------------------ shared phases
    def _status(self, opt, fail: Failure, m_r: int, sig: list[float]) -> list[int]:
        """Step 1: all-gather [failed, m_r, signature]; raises everywhere on any failure/mismatch."""
        rank, R = world(self.group)
        device = opt.param_groups[0]["params"][0].device     # NCCL needs CUDA tensors; gloo takes any
        status = torch.tensor([fail.flag, float(m_r)] + sig, dtype=torch.float64, device=device)
        table = [torch.empty_like(status) for _ in range(R)]
        dist.all_gather(table, status, group=self.group)
        self.traffic.add("(status)", "status all-gather", status)
        table = torch.stack(table)
        raise_if_any(bool(table[:, 0].any()), fail, self.group, opt._steps)
        for i, b in enumerate(opt.blocks):
            cols = table[:, 2 + 4 * i:6 + 4 * i]
            if not bool((cols == cols[0]).all()):
                raise TENGraDError(
                    f"rank disagreement at step {opt._steps}: layer {b.name!r} has (active, per-sample "
                    f"input numel, per-row output numel, rows per sample) = {cols.long().tolist()} by rank; "
                    "every rank must run the same model on batches with the same per-sample shape")
        return [int(v) for v in table[:, 1].tolist()]

    def _gradients(self, opt, m_r: int, wd: float):
        """Step 2 started: returns a function giving {id(param): global g + wd theta} when called."""
        params = [p for group in opt.param_groups for p in group["params"]]
        dtype = torch.float32
        for p in params:
            dtype = torch.promote_types(dtype, woodbury.compute_dtype(p.dtype))
        if self.ddp:
            grads = [(p.grad.detach() if p.grad is not None else torch.zeros_like(p)).to(dtype) for p in params]
            work = None
        else:
            work, flat = reduce_gradients(params, m_r, dtype, self.group)
            self.traffic.add("(gradient)", "all-reduce", flat)

        def finish() -> dict[int, Tensor]:
            nonlocal grads
            if work is not None:
                work.wait()
                grads = split_gradients(flat, params)
            out = {}
            for p, g in zip(params, grads):
                cd = woodbury.compute_dtype(p.dtype)
                g = g.to(cd)
                out[id(p)] = g + wd * p.detach().to(cd) if wd else g
            return out

        return finish

    @staticmethod
    def _check_finite(opt, grads: dict[int, Tensor]) -> None:
        """Same data on every rank, so every rank raises the same error here."""
        for b in opt.blocks:
            for n, p in zip(b.param_names, b.params):
                if p.grad is not None and not torch.isfinite(grads[id(p)]).all():
                    raise TENGraDError(f"layer {b.name!r}: non-finite gradient ({n})")
        for n, p in opt.fallback:
            if p.grad is not None and not torch.isfinite(grads[id(p)]).all():
                raise TENGraDError(f"parameter {n!r}: non-finite gradient")

    @staticmethod
    def _local_checks(opt) -> None:
        for b in opt.blocks:
            for p in b.params:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    raise TENGraDError(f"layer {b.name!r}: non-finite gradient")
        for n, p in opt.fallback:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise TENGraDError(f"parameter {n!r}: non-finite gradient")

    @staticmethod
    def _fallback(opt, grads, a):
        return [(p, grads[id(p)] / a, grads[id(p)]) for _, p in opt.fallback if p.grad is not None]

    # ------------------------------------------------------------------ "exact"
    def _exact(self, opt, a: float, wd: float):
        rank, R = world(self.group)
        blocks = opt.blocks
        fail = Failure()
        due = opt._steps % opt.update_freq == 0
        active = [any(p.grad is not None for p in b.params) for b in blocks]
        cur = [active[i] and (due or b.name not in self.kept) for i, b in enumerate(blocks)]
        rows: dict[int, Rows] = {}
        m_r = 0
        try:
            for i, b in enumerate(blocks):
                if cur[i]:
                    rows[i] = take_rows(opt, b)
                else:
                    b.capture.clear()
            m_r = self._batch_size([r.m for r in rows.values()])
            self._local_checks(opt)
        except Exception as err:   # noqa: BLE001 - every error of this rank is raised on every rank
            fail.record(err)
        sig = []
        for i in range(len(blocks)):
            r = rows.get(i)
            sig += [float(active[i]), 0.0 if r is None else float(r.x[0].numel()),
                    0.0 if r is None else float(r.gy[0].numel()), 0.0 if r is None else float(r.reps)]
        sizes = self._status(opt, fail, m_r, sig)
        grads_of = self._gradients(opt, m_r, wd)

        # plans and owners of the curvature blocks (identical on every rank: same sizes, same code)
        plans: dict[int, dplan.Exchange] = {}
        for i in rows:
            b, r = blocks[i], rows[i]
            key = ("exchange", tuple(sizes), tuple(r.x.shape[1:]), tuple(r.gy.shape[1:]), r.reps)
            if key not in b.choices:
                b.choices[key] = dplan.choose(b.plan, r.x.shape, r.gy.shape, r.x.element_size(),
                                              r.gy.element_size(), r.reps, sizes, b.numel,
                                              opt.max_jacobian_numel)
            plans[i] = b.choices[key]
        cur_ids = sorted(rows)
        owner_of = dict(zip(cur_ids, dplan.assign_owners([plans[i].owner_flops for i in cur_ids], R)))
        for i, b in enumerate(blocks):
            if active[i] and i not in owner_of:
                owner_of[i] = self.kept[b.name].owner

        # local rows: the explicit J_r when it is exchanged or cheaper for the products
        for i in cur_ids:
            b, r = blocks[i], rows[i]
            try:
                key = (tuple(r.x_rep().shape), tuple(r.gy.shape))     # the optimizer's own cache key
                if key not in b.choices:
                    b.choices[key] = paths.choose(b.plan, key[0], key[1], b.numel, opt.update_freq,
                                                  opt.max_jacobian_numel)
                local = b.choices[key]
                if plans[i].form == dplan.ROWS:
                    local = paths.PathChoice(paths.JACOBIAN, f"J_r formed: the owner gets rows ({local.note})")
                b.choice = local
                if local.path == paths.JACOBIAN:
                    r.form_jacobian(b.plan)
            except Exception as err:   # noqa: BLE001
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
                jac = r.jac if r.jac is not None else r.gy.new_zeros(r.n_rows, b.numel)
                payload = [pad0(jac, rows_max)]
            lists = [[torch.empty_like(t) for _ in range(R)] if rank == owner else None for t in payload]
            for t, lst in zip(payload, lists):
                works[i].append(dist.gather(t, gather_list=lst, dst=owner, group=self.group, async_op=True))
                self.traffic.add(b.name, f"{ex.form} gather", t)
            gathered[i] = lists

        grads = grads_of()
        try:
            self._check_finite(opt, grads)
        except TENGraDError:
            for w in (w for ws in works.values() for w in ws):
                w.wait()
            raise

        # 4. J_r g to the owners (async)
        order = [i for i in range(len(blocks)) if active[i]]
        jg_lists: dict[int, list[Tensor] | None] = {}
        for i in order:
            b = blocks[i]
            r = rows[i] if i in rows else self.kept[b.name].rows
            row_sizes = [r.reps * s for s in (sizes if i in rows else self.kept[b.name].sizes)]
            try:
                jg = r.jg(b.plan, [grads[id(p)] for p in b.params])
            except Exception as err:   # noqa: BLE001
                fail.record(err)
                jg = r.gy.new_zeros(r.n_rows)
            t = pad0(jg, max(row_sizes))
            lst = [torch.empty_like(t) for _ in range(R)] if rank == owner_of[i] else None
            works[i].append(dist.gather(t, gather_list=lst, dst=owner_of[i], group=self.group, async_op=True))
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
            buf = r.gy.new_zeros(n + 2)
            if rank == owner_of[i]:
                try:
                    for w in works[i]:    # this block's payloads and J g (launched by every rank)
                        w.wait()
                    gram, chol, used = self._owner_factor(b, r, plans.get(i), gathered.get(i), kept, bsizes, a)
                    jg_all = unpad_cat(jg_lists[i], row_sizes)
                    u = torch.cholesky_solve(jg_all.reshape(-1, 1).to(chol.dtype), chol).reshape(-1)
                    buf[:n] = u
                    buf[n] = used
                    self._pending[b.name] = Kept(r, owner_of[i], list(bsizes),
                                                 plans[i] if i in plans else kept.exchange, gram, chol, used, a)
                except Exception as err:   # noqa: BLE001
                    fail.record(err)
                    buf.zero_()
                    buf[n + 1] = 1.0
                self.traffic.add(b.name, "u broadcast", buf)
            elif i in rows:
                self._pending[b.name] = Kept(r, owner_of[i], list(bsizes), plans[i], None, None, 0.0, a)
            bcasts[i] = (dist.broadcast(buf, src=owner_of[i], group=self.group, async_op=True), buf)

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
            like = [grads[id(p)] for p in b.params]
            back = None
            if float(buf[n + 1]) == 0.0 and fail.error is None:
                try:
                    back = r.jtu(b.plan, buf[off:off + row_sizes[rank]], like)
                except Exception as err:   # noqa: BLE001
                    fail.record(err)
            if back is None:
                back = torch.zeros(sum(t.numel() for t in like), dtype=like[0].dtype, device=like[0].device)
            backs.append(back)
        flags = [float(buf[-1]) for _, buf in bcasts.values()]
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in backs) else torch.float32
        device = opt.param_groups[0]["params"][0].device
        flat = torch.cat([t.to(dtype) for t in backs]
                         + [torch.tensor([fail.flag + sum(flags)], dtype=dtype, device=device)])
        dist.all_reduce(flat, group=self.group)
        self.traffic.add("(all blocks)", "J^T u all-reduce", flat)
        for w in (w for ws in works.values() for w in ws):
            w.wait()
        raise_if_any(float(flat[-1]) != 0.0, fail, self.group, opt._steps)

        out, start = [], 0
        for i in order:
            b = blocks[i]
            like = [grads[id(p)] for p in b.params]
            for p, g in zip(b.params, like):
                back = flat[start:start + g.numel()].reshape(g.shape).to(g.dtype)
                start += g.numel()
                d = (g - back) / used[i]
                if not torch.isfinite(d).all():
                    raise TENGraDError(f"layer {b.name!r}: the preconditioned direction has non-finite entries")
                if p.grad is not None:
                    out.append((p, d, g))
        return out + self._fallback(opt, grads, a)

    @staticmethod
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

    # ------------------------------------------------------------------ "local"
    def _local(self, opt, a: float, wd: float):
        rank, R = world(self.group)
        blocks = opt.blocks
        fail = Failure()
        due = opt._steps % opt.update_freq == 0
        active = [any(p.grad is not None for p in b.params) for b in blocks]
        curv: dict[int, woodbury.BlockCurvature] = {}
        m_r = 0
        try:
            for i, b in enumerate(blocks):
                if not active[i]:
                    b.capture.clear()
                elif due or b.name not in self.kept:
                    curv[i] = opt._curvature(b, a)
                else:
                    b.capture.clear()
                    kept = self.kept[b.name]
                    curv[i] = kept if kept.requested == a else woodbury.redamp(kept, a, b.name)
            m_r = self._batch_size([c.m for i, c in curv.items() if due or blocks[i].name not in self.kept])
            self._local_checks(opt)
        except Exception as err:   # noqa: BLE001
            fail.record(err)
        sig = []
        for i in range(len(blocks)):
            sig += [float(active[i]), 0.0, 0.0, 0.0]
        self._status(opt, fail, m_r, sig)
        grads = self._gradients(opt, m_r, wd)()
        self._check_finite(opt, grads)
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
        dist.all_reduce(flat, group=self.group)
        self.traffic.add("(all blocks)", "direction all-reduce", flat)
        raise_if_any(float(flat[-1]) != 0.0, fail, self.group, opt._steps)
        flat = flat / R
        out, start = [], 0
        for i in order:
            b = blocks[i]
            for p in b.params:
                g = grads[id(p)]
                d = flat[start:start + g.numel()].reshape(g.shape).to(g.dtype)
                start += g.numel()
                if p.grad is not None:
                    out.append((p, d, g))
            self._pending[b.name] = curv[i]
        return out + self._fallback(opt, grads, a)

    # ------------------------------------------------------------------ printing
    def explain_lines(self, opt) -> list[str]:
        rank, R = world(self.group)
        grad = ("DDP model: gradients reduced in backward by TENGraD's DDP comm hook as "
                "sum_r m_r g_r / M (exact for uneven batches), none sent in the step") if self.ddp else \
            ("plain model: the step all-reduces [m_r g_r, m_r] (sum_r m_r g_r / M, exact for uneven batches)")
        lines = [f"  distributed={self.mode!r} over {R} ranks ({dist.get_backend(self.group)}), this is rank "
                 f"{rank}; {grad}"]
        if self.mode == "local":
            lines.append("    approximation: each rank preconditions with its own batch's curvature, "
                         "directions averaged in one all-reduce")
        by_layer = self.traffic.by_layer
        for b in opt.blocks:
            k = self.kept.get(b.name)
            sent = by_layer.get(b.name, {})
            last = ", ".join(f"{kind} {n} B" for kind, n in sent.items()) or "nothing"
            if self.mode == "exact" and isinstance(k, Kept):
                ex = k.exchange
                lines.append(f"    {b.name}: owner rank {k.owner}; curvature steps exchange {ex.form} "
                             f"({ex.bytes_factors} B factors vs {ex.bytes_rows} B rows per rank); "
                             f"last step sent {last}")
            else:
                lines.append(f"    {b.name}: last step sent {last}")
        for name in ("(status)", "(gradient)", "(all blocks)"):
            if name in by_layer:
                lines.append(f"    {name}: " + ", ".join(f"{kind} {n} B" for kind, n in by_layer[name].items()))
        lines.append(f"    this rank sent {self.traffic.total} B in the last step, {self.bytes_sent} B in "
                     f"{self.steps_seen} steps")
        return lines
