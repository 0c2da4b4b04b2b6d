"""The single-process estimator: every block's curvature from its own captured uses.

Per block b and step, with the group's damping a and weight decay (update.py ``gradient``):

* due (``update_freq`` k: steps 0, k, 2k, ...; staggered, stagger.py; or no curvature kept yet):
  R from this step's uses (curvature/build.py) and K = R R^T;
* otherwise the kept curvature, refactored when the group's damping changed;
* d_b = (F_b + a I)^-1 g_b = g_b / a + R_b^T u_b', u_b' = -(K_b + m a I)^-1 R_b g_b / a (woodbury.py);
  fallback parameters d = g / a.

The blocks are solved together (curvature/batched.py): every K to factor this step (fresh, or kept
with a changed damping) in one batched Cholesky per row count r, every u' in one batched
``cholesky_solve`` against the stacked factors (kept across reuse steps); the small explicit-J blocks'
R g and d = g / a + R^T u' in a few operations over their rows side by side (curvature/stacked.py); the
reuse-path blocks of one shape (a Transformer's equal Linears) in one batched contraction per term
(curvature/grouped.py).
Per block remain only the other blocks' R g and d (the plan's jvp/vjp on the block's x and gy, or
mat-vecs on its explicit J, with g / a added in the product); a block with a parameter of 2^20 elements
or more does not form d at all (``_deferrable``, update.Deferred: nu d goes into its momentum buffers).
<d, g> of a Woodbury block whose parameters all have a gradient is beta |g|^2 + u'^T R g from its own
solve (update.Known, ``products``): d is not read again before the momentum update.

A block that took no part in this forward is skipped (curvature/usage.py; a gradient this backward made
took part without its values being read). The noise statistics
tr(K)/m and 1^T K 1 / m^2 of every fresh empirical block feed the gradient-noise ratio (noise.py);
staggered, ``stagger.CycleSums`` collects them over a cycle. Nothing is kept until ``commit``.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from tengrad.optim.curvature import (batched, budget, consistency, eigenbasis, grouped, paths, scratch, stacked,
                                     tokens, usage, woodbury)
from tengrad.optim.curvature.block import Block
from tengrad.optim.curvature import build
from tengrad.optim.curvature import prior as prior_mod
from tengrad.optim.estimator import stagger
from tengrad.optim.estimator.base import Direction, StepInput
from tengrad.optim.noise import NoiseScale
from tengrad.optim import update
from tengrad.optim.update import gradient


class LocalEstimator:
    def __init__(self, staggered: bool = False, noise: bool = True) -> None:
        self.staggered = staggered
        self.noise = NoiseScale()                # the noise ratio r for the next step
        self.estimate_noise = noise
        self._cycle = stagger.CycleSums() if staggered else None
        self._due_memo: tuple | None = None      # (steps, k, n blocks, the due blocks)
        self._pending: dict[int, woodbury.BlockCurvature] = {}
        self._stats: tuple[list, list, list, int] = ([], [], [], 0)
        self._blocks: list[Block] = []
        self._solver = batched.Solver()          # the stacked factors, kept across reuse steps
        self._scratch = scratch.Scratch()        # the large parameters' direction buffers
        self._stacks: list[stacked.Stack] = []   # the small explicit-J blocks side by side (stacked.py)
        self._groups: list[grouped.Group] = []   # the reuse-path blocks of one shape batched (grouped.py)
        self._group_keys: dict[int, tuple] = {}  # {id(rows): (rows, grouped.key)}: worked out once per rows
        self.last_loss_scale = 1.0              # the loss scale taken out of the last step's rows
        self.last_rows: dict | None = None      # {m: sampled rows} of the last step (curvature_batch)
        self.budget_line: str | None = None     # the memory budget's line of explain() (curvature/budget.py)
        self._known: tuple[list, update.Known] | None = None   # (the last directions, their known products)
        self._seen = usage.Seen()                # the gradients the last step saw (which are new: usage.py)

    # ------------------------------------------------------------------ when
    def due(self, b: Block, steps: int, update_freq: int) -> bool:
        if not b.params:                # frozen: nothing to capture
            return False
        if self.staggered:
            return stagger.due(steps, b.offset, update_freq, b.curv is not None)
        return steps % update_freq == 0 or b.curv is None

    def curvature_due(self, blocks: list[Block], steps: int, update_freq: int) -> bool:
        if self.staggered:
            return bool(self.due_blocks(blocks, steps, update_freq))
        return steps % update_freq == 0 or any(b.curv is None and b.params for b in blocks)

    def due_blocks(self, blocks: list[Block], steps: int, update_freq: int) -> list[Block] | None:
        """Staggered: the blocks due at this step, worked out once per step (the gate asks before
        every forward); None when not staggered (every block together)."""
        if not self.staggered:
            return None
        memo = self._due_memo
        if memo is None or memo[:3] != (steps, update_freq, len(blocks)):
            memo = self._due_memo = (steps, update_freq, len(blocks),
                                     [b for b in blocks if self.due(b, steps, update_freq)])
        return memo[3]

    def forget(self) -> None:
        self._due_memo = None

    def drop(self, name: str) -> None:
        """Block ``name`` changed its parameters: its curvature (``Block.curv``) was dropped with them."""

    @property
    def noise_ratio(self) -> float:
        return self.noise.ratio

    def explain_lines(self, blocks: list[Block]) -> list[str]:
        lines = [self.budget_line] if self.budget_line else []
        if self._stacks:
            lines.append(f"  stacked (curvature/stacked.py): {sum(len(st.rows) for st in self._stacks)} small "
                         f"explicit-J blocks stepped together in {len(self._stacks)} stack(s), "
                         f"{sum(st.nbytes for st in self._stacks) / 2 ** 20:.2f} MB")
        if self._groups:
            lines.append(f"  grouped (curvature/grouped.py): {sum(len(g.rows) for g in self._groups)} reuse-path "
                         f"blocks of one shape stepped as batched contractions in {len(self._groups)} group(s), "
                         f"{sum(g.nbytes for g in self._groups) / 2 ** 20:.2f} MB")
        return lines

    def remove(self) -> None:
        """Nothing of its own is hooked to the model."""

    # ------------------------------------------------------------------ the step
    def directions(self, step: StepInput, skipped: dict[str, str]) -> list[Direction]:
        out: list[Direction] = []
        self._pending, self._blocks = {}, step.blocks
        candidates: list[tuple[int, Block, dict, list | None]] = []   # (i, b, group, uses or None: not due)
        for i, b in enumerate(step.blocks):
            if not b.params:
                skipped[b.name] = "frozen (no parameter of it requires grad)"
                continue
            group = step.group(b)
            if b.name in step.changed:      # set changed after its forward: no rows for the new set yet
                skipped[b.name] = ("its trainable parameters changed after the forward: d = g / damping "
                                   "this step, its curvature from the next curvature step")
                out += damped_identity(b.params, group, step.grads, step.rules.prior if step.adam_scale else None)
                continue
            due = self.due(b, step.steps, step.update_freq)
            candidates.append((i, b, group, step.uses.get(i, []) if due else None))
        # blocks that take part: (i, b, group, uses); the others skipped with the reason (usage.py)
        taking: list[tuple[int, Block, dict, list]] = []
        whys = usage.unused_all([(b.params, uses[0] if uses else None) for _, b, _, uses in candidates], self._seen)
        for (i, b, group, uses), why in zip(candidates, whys):
            if why is not None:
                skipped[b.name] = why
            else:
                taking.append((i, b, group, uses))
        due_uses = {i: uses for i, _, _, uses in taking if uses is not None}
        rules, line = budget.step_rules(step, due_uses)   # forms within the memory budget, the rows to sample
        self.budget_line = line if line is not None else self.budget_line
        fresh, scale, tols = self._fresh(step, due_uses, rules)
        curvs = self._curvatures(step, taking, fresh)
        gs = [[step.grads[id(p)] if step.grads is not None and id(p) in step.grads
               else gradient(p, group["weight_decay"], woodbury.compute_dtype(b.params[0].dtype)) for p in b.params]
              for _, b, group, _ in taking]
        # a block with a prior: g' = S g into the solve, d = S^T d' out of it (prior.py, eigenbasis.py)
        gps = [g if c.rows.prior is None else eigenbasis.into(c.rows.prior, g) for c, g in zip(curvs, gs)]
        # the small explicit-J blocks' R g and d together (curvature/stacked.py), the others block by block
        stacks = self._stacked(curvs, [b for _, b, _, _ in taking])
        # ... and the reuse-path blocks of one shape in batched contractions (curvature/grouped.py)
        groups = self._grouped(curvs, [b for _, b, _, _ in taking])
        rgs: list = [None] * len(taking)
        backs: list = [None] * len(taking)
        flats = [st.flat([gps[k] for k in ks]) for st, ks in stacks]
        for (st, ks), flat in zip(stacks, flats):
            for k, rg in zip(ks, st.jg(flat)):
                rgs[k] = rg
        gstacks = [grp.stack([gps[k] for k in ks]) for grp, ks in groups]
        for (grp, ks), p in zip(groups, gstacks):
            for k, rg in zip(ks, grp.jg(p)):
                rgs[k] = rg
        for k, ((i, b, group, uses), curv, g) in enumerate(zip(taking, curvs, gps)):
            rg = rgs[k] if rgs[k] is not None else curv.rows.jg(b.plan, g)
            if i in fresh and fresh[i][2] and self.screens(step, b, curv, group):   # reuses the direction's R g
                consistency.screen(b, curv.gram, rg, curv.m, tols[i])
            rgs[k] = rg
            self._pending[i] = curv
        # u_b' = -(K_b + m a_b I)^-1 R_b g_b / a_b, all blocks of a row count in one solve
        us, rg_us = self._solver.solve_with_products([c.chol for c in curvs], rgs, [-1.0 / c.damping for c in curvs])
        for (st, ks), flat in zip(stacks, flats):
            u = torch.stack([us[k] for k in ks])
            for k, d in zip(ks, st.direction(flat, u, [1.0 / curvs[k].damping for k in ks])):
                backs[k] = d
        for (grp, ks), p in zip(groups, gstacks):
            u = torch.stack([us[k] for k in ks])
            for k, d in zip(ks, grp.direction(p, u, [1.0 / curvs[k].damping for k in ks])):
                backs[k] = d
        priored: tuple[list, list] = ([], [])
        clipped: list[list[Tensor]] = []        # step_rule="adam": each block's d, its RMS clipped after S
        clip_scales: list = []                  # ... and its adam_scale
        known: list[int] = []                  # blocks whose <d, g> comes from the solve (update.Known)
        at: list[int] = []
        for k, ((i, b, group, _), curv, g, gp, u, back) in enumerate(zip(taking, curvs, gs, gps, us, backs)):
            # d = g / a + R^T u' (a prior's d' = g' / a + R'^T u'), the sum formed in R^T u's product
            if back is None and not step.adam_scale and _deferrable(b, curv, g, self._scratch.min_numel):
                # a large block: d is not formed; apply() adds nu d to the momentum buffers (update.Deferred)
                d = update.Deferred(curv.rows, b.plan, u, rgs[k], 1.0 / curv.damping, b.params, g)
                out += [(p, d, gi, group) for p, gi in zip(b.params, g)]
                continue
            if back is None:
                back = curv.rows.jtu(b.plan, u, gp, beta=1.0 / curv.damping, out=self._scratch.buffers(b.params, g))
            back = [t if t.dtype == gi.dtype else t.to(gi.dtype) for t, gi in zip(back, g)]
            if curv.rows.prior is not None:
                priored[0].extend(back)
                priored[1].extend(curv.rows.prior)
            if step.adam_scale:       # step_rule="adam": outside the rows m'' / sqrt(v) (prior.adam_scale)
                clipped.append(back)
                clip_scales.append(prior_mod.adam_scale(curv.damping, curv.rows.prior_mean))
            if all(p.grad is not None for p in b.params):      # <d, g> over the whole block: update.Known
                known.append(k)
                at.append(len(out))
            out += [(p, di, gi, group) for p, di, gi in zip(b.params, back, g) if p.grad is not None]
        if priored[0]:                                  # d = S^T d'
            eigenbasis.out_of_(priored[1], priored[0])
        # ... each block's d times its scale c, then clipped (S^T is linear: c S^T d' = S^T c d')
        prior_mod.scale_clip_(clipped, clip_scales)
        for (i, b, _, uses), curv in zip(taking, curvs):
            if uses is not None and curv.rows.explicit_held:   # bound again by the loss scale or the screen
                _unbind([b.plan] + [u.plan for u in uses])
        self._stats = self._noise_stats(step, taking, fresh, curvs)
        self.last_loss_scale = scale
        out += fallback_directions(step, step.grads)
        self._known = None
        if known and len({rg_us[k].device for k in known}) == 1:
            covered = {j for k, a in zip(known, at) for j in range(a, a + len(taking[k][1].params))}
            sq = _squares(gps, known, groups, gstacks, rg_us[known[0]].device)
            self._known = (out, update.Known(at, covered, sq, [rg_us[k] for k in known],
                                             [1.0 / curvs[k].damping for k in known]))
        return out

    def products(self, directions: list[Direction]) -> Tensor:
        """<d, g> of every direction (update.dots), the Woodbury blocks' from their solves (update.Known)
        when ``directions`` is what ``directions()`` returned last."""
        known = self._known[1] if self._known is not None and self._known[0] is directions else None
        self._known = None          # holds the step's d: not past the step
        return update.dots(directions, known)

    def _fresh(self, step: StepInput, due_uses: dict, rules) -> tuple[dict, float, dict]:
        """({i: (kept rows, K, screened: whole batch and no prior)} of the due blocks, the loss scale, {i: check tolerance}).

        Block by block (in block order), so the step holds one block's captured tensors beside the forms
        kept so far: rows (build.py, with ``rules``: the budget's forms and rows), the sampled rows
        (``rules.curvature_batch``: the same rows for every block, one draw per batch size m), a deferred
        J formed for those rows, K = R R^T; then the block's captured x and gy are released (nothing of
        the step reads them again; ``_release``) and an explicit J's x and gy go (``Rows.released``).
        The loss scale S comes from the whole-batch rows of the due block with the fewest captured
        elements (``loss_scale``; from the blocks after it in order when its gradient cancels to
        rounding, build.loss_scale); the rows
        are R / f with f = row_factor / S, so once S is known every fresh R becomes f R (no copy) and
        its K f^2 K."""
        fresh, tols, drawn = {}, {}, {}
        self.last_rows = None
        if not due_uses:
            return fresh, 1.0, tols
        draw = tokens.Draw(rules.token_rows, rules.generator) if rules.token_rows is not None else None
        # the loss scale from whole-batch rows: a block summed over uses has its rows per position at once
        # ... and the cheapest to ask: its J^T 1 and |J|^T 1 read the captured x and gy (a BatchNorm's 24
        # parameters sit on a [128, 12, 28, 28] input, a stem conv's 108 on [128, 1, 28, 28])
        first = min(due_uses, key=lambda i: (draw is not None and build.summed(step.blocks[i], due_uses[i], rules),
                                             _captured_numel(due_uses[i]), step.blocks[i].numel, i))
        scale, asking = None, False     # the cheapest block tells the scale; one that cannot, the next ones
        for i, uses in due_uses.items():
            b = step.blocks[i]
            tols[i] = _tolerance(b, uses)
            r = build.block_rows(b, uses, rules, step.check, draw=draw)
            if rules.prior is not None:          # which weights take the eigenbasis, from the whole batch
                rules.prior.decide(b, uses, r.m)
            if scale is None and (asking or i == first):
                scale = self.loss_scale(step, b, r, tols[i])
                asking = scale is None
            if draw is not None:                             # rows per position (curvature/tokens.py)
                r = build.at_positions(b, r, draw)
            # rows per position are not sampled again (curvature_batch is for sample rows) nor screened
            whole = r.tokens is None and (rules.curvature_batch is None or r.m <= rules.curvature_batch)
            if r.tokens is None and not whole:
                r = r.sampled(_draw(drawn, r, rules))
            if rules.curvature_batch is not None and r.tokens is None and _deferred(b, r):   # J of the sampled rows only
                r = r.explicit(b.plan)
            if rules.prior is not None:                      # R' = R D^-1/2 (curvature/prior.py)
                r = rules.prior.rows(r, b, rules.max_jacobian_numel,
                                     "moved to x and gy by the memory budget (budget.py)" if b.memory_reuse else None)
            gram = r.gram(b.plan)
            # the screen compares R g with K of the plain rows: not for the rows of a prior
            fresh[i] = (r.released(), gram, whole and r.prior is None)   # K formed: an explicit J's x and gy go
            if r.explicit_held:     # the plans' last bindings hold x, gy and a conv's windowed x
                _unbind([b.plan] + [u.plan for u in uses])
            del r
            _release(uses)
        scale = 1.0 if scale is None else scale
        f = step.row_factor / scale
        if f != 1.0:
            for i, (r, gram, whole) in fresh.items():
                fresh[i] = (r.scaled(f), gram.mul_(f * f), whole)
        self.last_rows = {**drawn, **(draw.drawn if draw is not None else {})} or None
        return fresh, scale, tols

    def _stacked(self, curvs: list, blocks: list[Block]) -> list[tuple[stacked.Stack, list[int]]]:
        """[(stack, positions in ``curvs``)]: the ``stacked.stackable`` blocks grouped by row count, dtype
        and device, groups of two or more; a kept stack is reused while it holds the same rows."""
        groups: dict[tuple, list[int]] = {}
        for k, c in enumerate(curvs):
            if stacked.stackable(c.rows):
                src = c.rows.jac if c.rows.jac is not None else c.rows.pieces[0]
                groups.setdefault((c.rows.n_rows, src.dtype, src.device), []).append(k)
        self._stacks, out = _regroup(self._stacks, groups, curvs,
                                     lambda rows, ks: stacked.Stack(rows, [[p.shape for p in blocks[k].params]
                                                                           for k in ks]))
        return out

    def _grouped(self, curvs: list, blocks: list[Block]) -> list[tuple[grouped.Group, list[int]]]:
        """[(group, positions in ``curvs``)]: the reuse-path blocks with one ``grouped.key``, groups of two
        or more; a kept group is reused while it holds the same rows."""
        keys, by_key = {}, {}
        for k, (c, b) in enumerate(zip(curvs, blocks)):
            seen = self._group_keys.get(id(c.rows))
            if seen is None or seen[0] is not c.rows:
                seen = (c.rows, grouped.key(c.rows, b.plan) if b.module_level else None)
            keys[id(c.rows)] = seen
            if seen[1] is not None:
                by_key.setdefault(seen[1], []).append(k)
        self._group_keys = keys
        self._groups, out = _regroup(self._groups, by_key, curvs,
                                     lambda rows, ks: grouped.Group(rows, [blocks[k].plan for k in ks]))
        return out

    @staticmethod
    def _curvatures(step: StepInput, taking: list, fresh: dict) -> list[woodbury.BlockCurvature]:
        """Each taking block's curvature for this step: fresh (``fresh``: rows and K formed), or the kept
        one; every fresh factor and every kept one whose group's damping changed in one batched
        factorisation (batched.factor_all)."""
        out: list = []
        todo: list[tuple[int, woodbury.Rows | None, Tensor, float]] = []   # (position, rows, K, a)
        for k, (i, b, group, _) in enumerate(taking):
            a = group["damping"]
            if i in fresh:
                todo.append((k, fresh[i][0], fresh[i][1], a))
                out.append(None)
            elif b.curv.requested != a:
                todo.append((k, None, b.curv.gram, a))
                out.append(None)
            else:
                out.append(b.curv)
        if todo:
            factors = batched.factor_all([t[2] for t in todo],
                                         [t[1].m if t[1] is not None else taking[t[0]][1].curv.m for t in todo],
                                         [t[3] for t in todo], [taking[t[0]][1].name for t in todo])
            for (k, r, gram, a), (chol, used) in zip(todo, factors):
                kept = taking[k][1].curv
                out[k] = (woodbury.BlockCurvature(r, gram, chol, used, a) if r is not None
                          else replace(kept, chol=chol, damping=used, requested=a))
        return out

    def _noise_stats(self, step: StepInput, taking: list, built: dict, curvs: list) -> tuple[list, list, list, int]:
        """tr(K)/m and 1^T K 1 / m^2 of every fresh empirical block (noise.py)."""
        traces, squares, fresh, rows_m = [], [], [], 0
        if not self.estimate_noise or step.rules.fisher != "empirical":
            return traces, squares, fresh, rows_m
        for (i, b, _, _), curv in zip(taking, curvs):
            if i in built and curv.gram.shape[0] == curv.m and curv.rows.tokens is None:
                traces.append(curv.gram.diagonal().sum().to(torch.float64) / curv.m)
                squares.append(curv.gram.sum().to(torch.float64) / curv.m ** 2)
                fresh.append(b.name)
                rows_m = curv.m
        return traces, squares, fresh, rows_m

    @staticmethod
    def screens(step: StepInput, b: Block, curv: woodbury.BlockCurvature, group: dict) -> bool:
        """Whether this fresh block gets the per-step screen (consistency.screen): empirical rows
        (one per sample), g = param.grad (every parameter has one; no weight decay folded in, not Adam's m
        of step_rule="adam"), a single process, checks on."""
        return (step.check.mode is not None and step.rules.fisher == "empirical" and not group["weight_decay"]
                and step.grads is None
                and curv.rows.n_rows == curv.m and all(p.grad is not None for p in b.params)
                and not consistency.multi_rank())

    @staticmethod
    def loss_scale(step: StepInput, b: Block, rows: woodbury.Rows, tol: float) -> float | None:
        """The loss scale the fresh rows of this step carry (build.loss_scale on the cheapest fresh
        block, ``rows`` its whole-batch rows: two products, J^T 1 and |J|^T 1, per step), taken out of every
        fresh block's rows; None when that block cannot tell (its gradient cancels to rounding). The same
        product checks that block's param.grad against its rows (a gradient penalty: refused)."""
        if step.rules.fisher != "empirical":
            return 1.0
        checked = step.check.mode is not None and not consistency.multi_rank()
        return build.loss_scale(b, rows, tol if checked else None)

    def commit(self) -> None:
        for i, curv in self._pending.items():
            self._blocks[i].curv = curv
        traces, squares, fresh, m = self._stats
        if traces and self._cycle is not None:     # staggered: the sums of a whole cycle (stagger.py)
            for name, t, q in zip(fresh, traces, squares):
                self._cycle.add(name, t, q, m)
            sums = self._cycle.take([b.name for b in self._blocks if b.curv is not None])
            if sums is not None:
                self.noise.update(*sums)
        elif traces:
            self.noise.update(traces, squares, m)
        self._pending, self._stats = {}, ([], [], [], 0)
        self._due_memo = None

    # ------------------------------------------------------------------ checkpoints
    def state(self, blocks: list[Block]) -> dict:
        """{"blocks": {name: kept curvature and path choice}, "noise": the noise statistics}."""
        kept = {}
        for b in blocks:
            if b.curv is not None:
                kept[b.name] = dict(b.curv.state(), choice=None if b.choice is None else (b.choice.path,
                                                                                            b.choice.note))
        return {"blocks": kept, "noise": self.noise.state()}

    def load(self, blocks: list[Block], prepared: dict) -> None:
        """Commit a checked state (checkpoint.py): each block's curvature (absent: none) and the noise."""
        for b in blocks:
            b.curv, b.choice = prepared["curv"].get(b.name, (None, None))
        self.noise = NoiseScale()
        if prepared["noise"] is not None:
            self.noise.load(prepared["noise"])
        if self._cycle is not None:
            self._cycle = stagger.CycleSums()
        self._due_memo = None


def _draw(drawn: dict, r: woodbury.Rows, rules) -> Tensor:
    """The sampled samples [c] of batch size r.m: one draw per m and step (sorted, from
    ``rules.generator``), the same for every block of that batch size."""
    if r.m not in drawn:
        device = (r.jac if r.jac is not None else r.pieces[0] if r.pieces is not None else r.gy).device
        perm = torch.randperm(r.m, generator=rules.generator)
        drawn[r.m] = perm[:rules.curvature_batch].sort().values.to(device)
    return drawn[r.m]


def _regroup(kept: list, groups: dict, curvs: list, make) -> tuple[list, list]:
    """(the objects now, [(object, positions in ``curvs``)]) for the ``groups`` {key: positions} of two or
    more blocks: a ``kept`` stack or group (stacked.py, grouped.py) while it ``holds`` the same rows
    objects, else ``make(rows, positions)``."""
    by_first = {id(o.rows[0]): o for o in kept}
    out = []
    for ks in groups.values():
        if len(ks) < 2:
            continue
        rows = [curvs[k].rows for k in ks]
        o = by_first.get(id(rows[0]))
        if o is None or not o.holds(rows):
            o = make(rows, ks)
        out.append((o, ks))
    return [o for o, _ in out], out


def _squares(gps: list, known: list[int], groups: list, gstacks: list, device) -> Tensor:
    """|g_k|^2 of the blocks ``known`` (positions in ``gps``), float64: the grouped blocks' from their
    stacked copies (grouped.Group.squares), the others' in one multi-tensor norm (update.squares)."""
    at = {k: j for j, k in enumerate(known)}
    out = torch.zeros(len(known), dtype=torch.float64, device=device)
    done = set()
    for (grp, ks), p in zip(groups, gstacks):
        mine = [(j, at[k]) for j, k in enumerate(ks) if k in at]
        if mine:
            sq = grp.squares(p).to(device)
            out[[a for _, a in mine]] = sq[[j for j, _ in mine]]
            done.update(ks)
    rest = [k for k in known if k not in done]
    if rest:
        out[[at[k] for k in rest]] = update.squares([gps[k] for k in rest], device)
    return out


def _unbind(plans) -> None:
    """Drop the last binding of each plan (compiler/compiled.py ``unbind``): it holds the tensors of its
    last call (a block's x and gy, a conv's windowed copy of x) until the next call."""
    for plan in {id(p): p for p in plans if p is not None}.values():
        getattr(plan, "unbind", lambda: None)()


def _release(uses) -> None:
    """Drop a block's captured tensors once its rows and K exist: its records were taken from the capture,
    so the layer inputs and output gradients (and a J formed in the backward) are freed here, as
    autograd frees them for SGD, unless the kept rows hold them. The freed heap stays with the process
    (no malloc_trim): the next forward reuses it, and handing it back cost 10-15% of a curvature step in
    page faults and trims without lowering the peak (docs/experiments/step-cost.md)."""
    for u in uses:
        u.x, u.grad, u.rows, u.jac = None, None, [], None


def _deferred(b: Block, r) -> bool:
    """A block whose path keeps an explicit J but whose rows came as x and gy (a curvature batch)."""
    return (b.choice is not None and b.choice.path == paths.JACOBIAN and not r.explicit_held
            and b.plan is not None and r.x is not None)


def _captured_numel(uses: list) -> int:
    """Elements of the inputs and output gradients a block's uses captured (what its products read)."""
    return sum(t.numel() for u in uses for t in (u.x, u.grad) if isinstance(t, torch.Tensor))


def _tolerance(b: Block, uses) -> float:
    """The check's tolerance for the block's parameters and its uses' captured output gradients."""
    dtypes = [u.grad.dtype for u in uses if u.grad is not None] or [b.params[0].dtype]
    return max(consistency.tolerance(b.params[0].dtype, d) for d in dtypes)


def damped_identity(params, group: dict, grads: dict | None = None, adam=None) -> list[Direction]:
    """d = g / a for ``params`` (those with a gradient that train now: a parameter frozen after the backward
    keeps its gradient but must not move, options.py) in ``group``; ``grads``: {id(param): g} (under
    step_rule="adam" Adam's m), else g from param.grad (update.gradient). ``adam`` (step_rule="adam": the
    step's prior.Prior): Adam's step per parameter instead, d = m / max(sqrt v', floor mean sqrt v')
    clipped to RMS 1 (prior.adam_direction)."""
    out = []
    for p in params:
        if p.grad is None or not p.requires_grad:
            continue
        g = grads[id(p)] if grads is not None and id(p) in grads else gradient(p, group["weight_decay"],
                                                                               woodbury.compute_dtype(p.dtype))
        d = g / group["damping"] if adam is None else prior_mod.adam_direction(adam, p, g)
        out.append((p, d, g, group))
    return out


def fallback_directions(step: StepInput, grads: dict | None = None) -> list[Direction]:
    """d = g / a for the parameters in no block, each in its own group (under step_rule="adam" Adam's
    step on m: ``damped_identity``)."""
    adam = step.rules.prior if step.adam_scale else None
    out = []
    for _, p in step.fallback:
        out += damped_identity([p], step.groups[step.where[id(p)]], grads, adam)
    return out


def _deferrable(b: Block, curv, g: list, min_numel: int) -> bool:
    """Whether block ``b``'s d is left unformed (update.Deferred): a parameter of at least ``min_numel``
    elements (curvature/scratch.py's large parameters), every parameter with a gradient and in the compute
    dtype (the momentum buffer takes R^T u in place), no prior (d = S d' would need d formed)."""
    return (curv.rows.prior is None and any(p.numel() >= min_numel for p in b.params)
            and all(p.grad is not None and p.dtype == gi.dtype for p, gi in zip(b.params, g)))
