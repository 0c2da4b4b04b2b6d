"""The TENGraD optimizer (paper, equation 4, with a block-diagonal Fisher).

Per block (one module's trainable parameters) and step, with g the mean gradient (``param.grad``):

    g   <- g + weight_decay * theta                       (coupled decay, see below)
    d    = (F + a I)^-1 g = (1/a)(g - R^T (K + m a I)^-1 R g)      (woodbury.py; R, F: fisher.py)
    nu   = min(1, r sqrt(kl_clip / sum_blocks lr_b^2 <d, g>))  (KL clipping, stepctl.py; 1 if kl_clip=None;
                                                          lr_b: the largest lr so far, so schedules act;
                                                          r: the gradient-noise ratio, noisescale.py)
    buf  = momentum * buf + nu d                           (heavy ball, like torch.optim.SGD)
    theta <- theta - lr * buf

Parameters of modules without a layer plan use d = g / a. lr, a, momentum and weight_decay are those
of the block's param group (groups.py); every hyperparameter is validated at construction and at each
step (hyperparams.py).

Decisions:

* Weight decay is *coupled*: it is added to g before preconditioning, so the step is the damped natural
  gradient of loss + (weight_decay/2)||theta||^2 and the oracle (F + a I)^-1 (g + wd theta) holds exactly.
* Capture (capture.py): only forwards with grad enabled, the model (not each module) in training mode,
  and curvature due for the next step are recorded; eval-mode or no_grad forwards never touch the
  captured batch or the stored curvature. Curvature comes from the backward passes since the last
  ``zero_grad()``/``step()``. What is seen is the model's forward and the backward through it
  (wrappers on its modules, forward_wrap.py): a layer called outside them is refused by the
  consistency check naming the layer.
* Weight sharing: every use of a block's parameters in the captured forward (module calls, op calls
  outside them, row slices) is one term of the block's J = sum_u J_u (shared.py, op_capture.py); a
  parameter shared by several modules, or a free parameter, starts as fallback and becomes a block
  at the first captured step where an op with a spec reads it (blocks.promote). Gradients
  accumulated over several forwards before a curvature step are refused naming the block.
* update_freq k: steps 0, k, 2k, ... are curvature steps (K, its Cholesky factor and R from that batch are
  kept); the other steps apply the kept curvature to their fresh gradient. A change of the group's
  damping between curvature steps refactors the kept K. ``stagger=True``: block i refreshes on the
  steps t with (t - i) mod k == 0 instead, so each step captures about 1/k of the blocks (stagger.py).
* A block whose module took no part in this forward (no gradient, or zero gradient and no capture) is
  skipped, with the reason in ``opt.skipped`` and ``explain()`` (usage.py).
* ``load_state_dict`` is all or nothing (checkpoint.py).
* Every direction is computed (and checked finite, once for the whole step: one sum per tensor, and
  only if one of those is not finite an element-wise search for the culprit) before anything is
  written: a non-finite gradient, Gram matrix or direction raises an error naming the layer and leaves
  parameters, momentum buffers and the stored curvature untouched.
* Gradient from the Jacobian (``grad_from_jacobian``, on by default, single process only): on a
  curvature step of the empirical Fisher, a block that keeps an explicit Jacobian J (paths.py) gets
  ``param.grad`` = J^T 1/m from that J, computed during ``backward()``; autograd's own weight gradient
  of that layer, which would cost as much again, is skipped (capture.py). Autograd hooks registered on
  those parameters' gradient accumulators do not fire on such steps; pass ``grad_from_jacobian=False``
  if you rely on them.
* The batch m is dimension ``batch_dim`` of the model's first input; each use's sample dimension is
  the one of size m (shared.sample_first; ambiguous or absent raises), and the loss is mean-reduced
  over the batch. ``batch_dim={"": d, layer: d_layer}`` declares dims per layer.
"""
from __future__ import annotations

import warnings
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from tengrad.optim import distributed as distributed_mod
from tengrad.optim import fisher as fisher_mod
from tengrad.optim import checkpoint, groups, hyperparams, paths, shared, stepctl, usage, woodbury
from tengrad.optim import stagger as stagger_mod
from tengrad.optim.blocks import Block, find_blocks, promote, resolve_backend
from tengrad.optim.op_capture import OpCapture
from tengrad.optim.op_specs import module_leading_dims
from tengrad.optim.capture import CURVATURE, GRADIENT, LayerCapture
from tengrad.optim.consistency import ConsistencyCheck
from tengrad.optim.errors import TENGraDError
from tengrad.optim.noisescale import NoiseScale
from tengrad.optim.report import fallback_warning


class TENGraD(torch.optim.Optimizer):
    """Time-efficient natural gradient with exact per-layer Fisher blocks.

    Usage (empirical Fisher)::

        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()

    Any Fisher (``fisher`` in "empirical", "mc", "exact")::

        out = model(x); opt.zero_grad(); loss = opt.backward(out, y, loss="cross_entropy"); opt.step()

    Args: ``lr``, ``damping`` (a), ``momentum``, ``weight_decay`` (coupled) are the defaults of the
    param groups and may be changed between steps through ``opt.param_groups`` (LR schedulers work).
    ``param_groups``: torch-style ``[{"params": [...], "lr": ..., "damping": ..., ...}, ...]`` after the
    model; unlisted trainable parameters form a last group with the keyword values (groups.py).
    ``update_freq`` k: curvature every k steps. ``fisher``: "empirical", "mc" (one extra backward
    with sampled labels; ``generator`` makes them reproducible, ``opt.last_labels`` holds them) or
    "exact" (one extra backward per output unit). ``backend`` goes
    to ``tengrad.compile`` ("auto" is "torch" on CPU). ``kl_clip``: K-FAC's KL clipping, the step's
    squared damped-Fisher length sum_b lr_b^2 nu^2 <d_b, g_b> is kept <= kl_clip (stepctl.py); None:
    the exact step. ``noise_scale``: shrink that bound to r^2 kl_clip, r = s / max(s so far) with
    s = |G|^2 / E|g|^2 the share of the batch gradient that is signal, estimated from the per-sample
    rows of the curvature steps (noisescale.py; empirical Fisher, single process; False: r = 1).

    Defaults (``TENGraD(model)``): lr 0.3, damping 1, momentum 0.9, update_freq 10, kl_clip 6.4e-3
    with the noise ratio; lr and damping chosen from the lr x damping grid of benchmarks/robustness.py,
    kl_clip and the noise ratio from the time-to-accuracy runs of benchmarks/tta.py and tta_explore.py
    (README: "Choosing lr, damping and update_freq").
    ``max_jacobian_numel``: the largest explicit per-layer Jacobian (rows x params) paths.py may keep.
    ``check``: verify J^T 1 / m == param.grad and the batch dimension per block (consistency.py; one
    vjp per block) on its first curvature step (False), on every curvature step (True) or never (None).
    ``opt.explain()`` (also ``repr``) lists each block, its path choice and the fallback parameters.
    ``stagger``: False (default): every block refreshes its curvature on steps 0, k, 2k, ...; True:
    block i on steps t with (t - i) mod k == 0, so every step captures about 1/k of the blocks and no
    step carries the whole capture (stagger.py; empirical Fisher, one process).
    ``distributed``: "auto" ("exact" inside an initialised torch.distributed group of several ranks),
    "exact" (the single-process step on the global batch), "local" (own-batch curvature, directions
    averaged: an approximation) or None; see distributed.py.
    """

    def __init__(self, model: nn.Module, lr: float = stepctl.DEFAULT_LR,
                 damping: float = stepctl.DEFAULT_DAMPING, momentum: float = 0.9,
                 weight_decay: float = 0.0, update_freq: int = stepctl.DEFAULT_UPDATE_FREQ,
                 fisher: str = "empirical", backend: str = "auto",
                 kl_clip: float | None = stepctl.DEFAULT_KL_CLIP,
                 generator: torch.Generator | None = None, max_jacobian_numel: int = 2 ** 26,
                 param_groups: list[dict] | None = None, check: bool | None = False,
                 distributed: str | None = "auto", batch_dim: int | dict = 0,
                 grad_from_jacobian: bool = True, noise_scale: bool = True, stagger: bool = False) -> None:
        model = hyperparams.check_model(model)
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        for key, value in defaults.items():
            hyperparams.check_value(key, value)
        hyperparams.check_options(fisher, update_freq, kl_clip, max_jacobian_numel, generator)
        self._dist = distributed_mod.resolve(distributed, model)   # None: single process
        groups_given = groups.build(model, param_groups)
        if not any(g["params"] for g in groups_given):
            raise TENGraDError("the model has no trainable parameters")
        super().__init__(groups_given, defaults)
        self.model = model
        self.fisher = fisher
        self.update_freq = int(update_freq)
        self.kl_clip = kl_clip
        if not isinstance(noise_scale, bool):
            raise TENGraDError(f"noise_scale must be True or False, got {noise_scale!r}")
        self.noise_scale = noise_scale
        if not isinstance(stagger, bool):
            raise TENGraDError(f"stagger must be True or False, got {stagger!r}")
        if stagger and fisher != "empirical":
            raise TENGraDError(f"stagger=True needs fisher='empirical', not {fisher!r}: the {fisher} Fisher runs "
                               "extra backward passes on every curvature step, which staggered is every step")
        if stagger and self._dist is not None:
            raise TENGraDError("stagger=True is single-process only: the distributed step decides curvature "
                               "steps for all ranks together (distributed.py)")
        self.stagger = stagger
        self._cycle = stagger_mod.CycleSums() if stagger else None   # noise sums over a cycle (stagger.py)
        self._select_memo: tuple | None = None   # staggered: (due memo, _select_capture's answer)
        self._tracked_memo: tuple | None = None  # staggered: (due memo, _tracked_params's answer)
        self._due_memo: tuple | None = None      # staggered: (steps, k, blocks due) for this step
        self._noise = NoiseScale()               # the noise ratio r for the next step (noisescale.py)
        self.generator = generator
        self.max_jacobian_numel = int(max_jacobian_numel)
        # gradient from the Jacobian: single process and empirical Fisher only (distributed ranks reduce
        # gradients through their own hooks)
        self.grad_from_jacobian = bool(grad_from_jacobian) and fisher == "empirical" and self._dist is None
        self.backend = resolve_backend(model, backend)
        # op-only blocks (MultiheadAttention's projections) are single-process only: the distributed
        # step needs a module plan per block
        self.blocks, self.fallback, self.fallback_why = find_blocks(model, self.backend, self._dist is None)
        self._number_blocks()
        where = groups.index_of(self.param_groups)
        for b in self.blocks:          # a block straddling groups is refused now, not at step()
            groups.group_of_block(b.name, b.param_names, b.params, where)
        self.batch_dim, self.layer_dims = _batch_dims(batch_dim)
        self._phase = GRADIENT
        self._steps = 0
        self._opt_backward = False
        self.skipped: dict[str, str] = {}        # block name -> why the last step left it alone
        self.last_labels: Tensor | None = None   # labels drawn by the last opt.backward (fisher="mc")
        self._tracked = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}
        self._ops = OpCapture(model, self._tracked_params, self._curvature_due, lambda: self._phase,
                              self.batch_dim, keep_edges=fisher != "empirical", select=self._select_capture)
        # J^T 1/m == grad, batch dim; its forward hook is a capture hook (off on reuse steps)
        self._consistency = ConsistencyCheck(model, check, self.batch_dim, hooks=self._ops.hooks)
        self.last_nu = 1.0                       # the KL-clipping factor of the last step (stepctl.py)
        for b in self.blocks:          # armed per block: a block without curvature yet arms only itself
            if b.plan is None:         # captured at its ops only
                continue
            b.capture = LayerCapture(b.name, b.module, partial(self._block_due, b), lambda: self._phase,
                                     keep_edges=fisher != "empirical", training=lambda: model.training,
                                     forward_id=lambda: self._ops.fwd)
            b.capture.fuse_params = [(n, p) for n, p in b.plan.params if p.requires_grad]
            b.capture.on_fused_grad = partial(self._fused_grad, b)
            if b.module is model:      # the root: hooks after the gate's (forward_wrap.py wraps submodules)
                b.capture.attach(self._ops.hooks)
            self._ops.cover(b.module, b.params)
        self._ops.skip_builtin_subtrees(model, {id(p) for b in self.blocks if b.capture is not None
                                                for p in b.params})
        self._consistency.names = {b.name for b in self.blocks}
        self._all_captures = [(b.module, b.capture.wrap) for b in self.blocks if b.capture is not None]
        self._labels = {id(p): f"layer {b.name!r}" for b in self.blocks for p in b.params}
        self._labels.update({id(p): f"parameter {n!r}" for n, p in self.fallback})
        if self.fallback:
            warnings.warn(fallback_warning(model, self.fallback, self.fallback_why), stacklevel=2)

    def add_param_group(self, param_group: dict) -> None:
        """Groups are fixed at construction (``param_groups=``): the blocks and hooks are built from the
        model then, so a group added later would hold parameters that no block or fallback updates."""
        if hasattr(self, "blocks"):
            raise TENGraDError("add_param_group after construction is not supported: pass "
                               "param_groups=[{'params': [...], ...}, ...] to TENGraD(model, ...)")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ when curvature is captured
    def _curvature_due(self) -> bool:
        if self._dist is not None:
            return self._dist.curvature_due(self)
        if self.stagger:
            return bool(self._due_blocks())
        return self._steps % self.update_freq == 0 or any(b.curv is None for b in self.blocks)

    def _due_blocks(self) -> list[Block]:
        """Staggered: the blocks due at this step, worked out once per step (the gate asks before
        every forward); ``step()``, a promotion and ``load_state_dict`` forget it."""
        memo = self._due_memo
        if memo is None or memo[0] != self._steps or memo[1] != self.update_freq:
            memo = self._due_memo = (self._steps, self.update_freq,
                                     [b for b in self.blocks if self._block_due(b)])
        return memo[2]

    def _block_due(self, b: Block) -> bool:
        if self._dist is not None:
            return self._dist.block_due(self, b)
        if self.stagger:
            return stagger_mod.due(self._steps, b.phase, self.update_freq, b.curv is not None)
        return self._steps % self.update_freq == 0 or b.curv is None

    def _number_blocks(self) -> None:
        for i, b in enumerate(self.blocks):     # the step offset of each block under stagger.py
            b.phase = i

    def _tracked_params(self) -> dict[int, tuple[str, Tensor]]:
        """The parameters op_capture records uses of in this captured forward: all trainable ones;
        staggered, those of the due blocks and the fallback (a fallback read by an op with a spec
        becomes a block, blocks.promote)."""
        if not self.stagger:
            return self._tracked
        self._due_blocks()
        memo = self._tracked_memo
        if memo is None or memo[0] is not self._due_memo:     # once per step
            ids = {id(p) for b in self._due_memo[2] for p in b.params}
            ids.update(id(p) for _, p in self.fallback)
            memo = self._tracked_memo = (self._due_memo, {i: v for i, v in self._tracked.items() if i in ids})
        return memo[1]

    def _select_capture(self, due: bool) -> tuple[bool, bool, list]:
        """op_capture's gate, before every forward of the model: whether this forward, if captured,
        needs the op-level TorchFunctionMode and MultiheadAttention's recording, and the (module, make)
        wrappers of the module-level captures to install for it (forward_wrap.py). Without staggering
        all of them whenever curvature is due; staggered, those of the due blocks, and the mode /
        attention recording when a due block had such uses or was never captured."""
        if not due:
            return False, False, []
        if not self.stagger:
            return True, True, self._all_captures
        now = self._due_blocks()
        memo = self._select_memo
        if memo is None or memo[0] is not self._due_memo:
            memo = self._select_memo = (self._due_memo, (
                any(b.mode_used is not False for b in now), any(b.mha_used is not False for b in now),
                [(b.module, b.capture.wrap) for b in now if b.capture is not None]))
        return memo[1]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and forget the output gradients captured since the last step."""
        super().zero_grad(set_to_none=set_to_none)
        for b in self.blocks:
            if b.capture is not None:
                b.capture.clear()
        self._ops.clear()

    # ------------------------------------------------------------------ backward for any Fisher
    def backward(self, out: Tensor, y: Tensor, loss: str | Callable = "cross_entropy",
                 generator: torch.Generator | None = None) -> Tensor:
        """Run the backward passes this optimizer's Fisher needs; returns the (detached) mean loss.

        The loss gradient (true labels ``y``) always goes into ``param.grad``. When curvature is due,
        "mc" adds one backward with labels drawn from the model (``generator`` or the optimizer's,
        kept in ``opt.last_labels``) and "exact" one backward per output unit (fisher.py); those extra
        passes only feed the layer captures (they stop at the layer outputs: no weight gradients).
        """
        name, loss_fn = fisher_mod.resolve_loss(loss)
        if self.fisher != "empirical" and callable(loss):
            raise TENGraDError(f"fisher={self.fisher!r} needs loss 'cross_entropy' or 'mse', not a callable")
        value = loss_fn(out, y)
        if self.fisher != "empirical" and self._curvature_due():
            if self.fisher == "mc":
                self.last_labels = fisher_mod.sample_labels(out, name, generator or self.generator)
                vs = fisher_mod.mc_grad_outputs(out, loss_fn, self.last_labels)
            else:
                vs = fisher_mod.exact_grad_outputs(out, name)
            # differentiate w.r.t. the layer outputs' gradient edges: the hooks see gy, and no
            # weight gradient is computed (parameters are the fallback on torch without edges)
            inputs = [e for b in self.blocks if b.capture is not None for e in b.capture.edges()]
            inputs += list(self._ops.edges)
            inputs = inputs or [p for b in self.blocks for p in b.params]
            self._phase = CURVATURE
            try:
                for v in vs:
                    torch.autograd.grad(out, inputs, grad_outputs=v, retain_graph=True, allow_unused=True)
            finally:
                self._phase = GRADIENT
                for b in self.blocks:
                    if b.capture is not None:
                        b.capture.clear_edges()
                self._ops.edges = []
        value.backward()
        self._opt_backward = True
        return value.detach()

    # ------------------------------------------------------------------ the step
    def _fused_grad(self, b: Block, record, grad: Tensor) -> None:
        """Called during backward for a call whose parameters were detached (capture.py): forms
        J / m = plan.jacobian(x, dL/dy), keeps it in the record and adds its column sums to p.grad."""
        dtype = woodbury.compute_dtype(b.params[0].dtype)
        with torch.no_grad(), torch.autocast(device_type=grad.device.type, enabled=False):
            x = record.x.to(dtype) if record.x.is_floating_point() else record.x
            jac = b.plan.jacobian(x, grad.to(dtype))
            for p, j in zip(b.params, jac):
                gp = j.sum(0).to(p.dtype)
                if p.grad is None:
                    p.grad = gp
                else:
                    p.grad.add_(gp)
        record.jac = list(jac) if record.jac is None else [a + c for a, c in zip(record.jac, jac)]

    def _gradient(self, p: Tensor, wd: float, dtype: torch.dtype) -> Tensor:
        g = p.grad.detach().to(dtype) if p.grad is not None else torch.zeros_like(p, dtype=dtype)
        g = g.to_dense() if g.is_sparse else g      # Embedding(sparse=True): the direction is dense
        return g + wd * p.detach().to(dtype) if wd else g

    def _curvature(self, b: Block, damping: float, rec) -> woodbury.BlockCurvature:
        if rec is None or (rec.grad is None and not rec.rows):
            raise self._consistency.missing_capture(b)
        dtype = woodbury.compute_dtype(b.params[0].dtype)
        rec = self._sample_first(b, rec)
        x = rec.x.to(dtype) if rec.x.is_floating_point() else rec.x
        m = x.shape[0]
        self._consistency.verify(b, x, rec.grad)
        if self.fisher == "empirical" and rec.grad is not None:   # gy = m * grad, formed below if needed
            gy, gy_shape = None, tuple(rec.grad.shape)
        else:
            gy = fisher_mod.output_rows(f"layer {b.name!r}", self.fisher, rec.grad, rec.rows, m, dtype)
            gy_shape = tuple(gy.shape)
        reps = gy_shape[0] // m                                          # [C*m, ...], row c*m + i
        if reps > 1:
            x = x.unsqueeze(0).expand(reps, *x.shape).reshape(reps * m, *x.shape[1:])
        key = (tuple(x.shape), gy_shape)
        if key not in b.choices:          # pricing runs the cost model: once per block and sizes
            b.choices[key] = paths.choose(b.plan, key[0], key[1], b.numel, self.update_freq,
                                          self.max_jacobian_numel)
        b.choice = b.choices[key]
        if self.update_freq > 1 and b.choice.path == paths.REUSE and x is rec.x:
            x = x.clone()   # kept for k steps: must not alias a batch buffer the caller may refill
        fused = b.choice.path == paths.JACOBIAN and self.grad_from_jacobian
        # next curvature step: detach this layer's parameters for inputs of this shape (capture.py)
        b.capture.set_fuse(tuple(rec.x.shape) if fused else None)
        pieces = None
        if fused and rec.jac is not None:
            pieces = rec.jac                                        # the record holds J / m: R = m pieces
        elif gy is None and b.choice.path == paths.JACOBIAN:
            pieces = b.plan.jacobian(x, rec.grad.to(dtype))          # J / m from dL/dy = gy / m
        elif gy is None:
            gy = fisher_mod.output_rows(f"layer {b.name!r}", self.fisher, rec.grad, rec.rows, m, dtype)
        return woodbury.build(b.plan, x, gy, m, damping, b.choice.path, b.name, pieces=pieces, scale=float(m))

    def _sample_first(self, b: Block, rec):
        """The record with the sample moved to dimension 0 (shared.sample_first); same object if so."""
        m = self._ops.batches.get(rec.fwd)
        if m is None or rec.x.dim() == 0:
            return rec
        lead = module_leading_dims(b.module, rec.x)
        declared = self.layer_dims.get(b.name)
        if declared is None and rec.x.shape[0] == m and all(rec.x.shape[d] != m for d in range(1, lead)):
            return rec
        ts = ([rec.grad] if rec.grad is not None else []) + list(rec.rows)
        x, ts = shared.sample_first(b.name, rec.x, ts, m, lead, declared=declared)
        out = type(rec)(x, rec.fwd)
        if rec.grad is not None:
            out.grad, ts = ts[0], ts[1:]
        out.rows = ts
        return out

    def _parts(self, b: Block, recs: list, uses: list) -> list:
        """Every call of block ``b`` in this step as shared.Part (sample first)."""
        calls = []
        for rec in recs:
            rec = self._sample_first(b, rec)
            parts = [(p, None) if any(p is q for q in b.params) else None for _, p in b.plan.params]
            calls.append(shared.Part(b.name, b.plan, parts, rec.x, rec.grad, rec.rows))
        for u in uses:
            ts = ([u.grad] if u.grad is not None else []) + list(u.rows)
            x, ts = shared.sample_first(u.name, u.x, ts, u.m, u.lead, u.seq_first,
                                        self.layer_dims.get(b.name))
            grad = ts.pop(0) if u.grad is not None else None
            calls.append(shared.Part(u.name, u.plan, u.parts, x, grad, ts))
        return calls

    def _shared_curvature(self, b: Block, damping: float, recs: list, uses: list) -> woodbury.BlockCurvature:
        """Curvature of a block with several calls, op-level uses or slices (shared.py)."""
        fwds = {r.fwd for r in recs} | {u.fwd for u in uses}
        if len(fwds) > 1:
            raise TENGraDError(
                f"layer {b.name!r} received output gradients from {len(fwds)} forward passes since the "
                "last zero_grad()/step(): gradients were accumulated over several forward/backward passes; "
                "TENGraD's curvature needs one forward per step")
        calls = self._parts(b, recs, uses)
        dtype = woodbury.compute_dtype(b.params[0].dtype)
        m = int(calls[0].x.shape[0])
        for c in calls:
            if int(c.x.shape[0]) != m:
                raise TENGraDError(f"layer {b.name!r}: its uses saw batches {[int(c.x.shape[0]) for c in calls]}")
        empirical = self.fisher == "empirical"
        J = shared.jacobian(b.params, calls, m, dtype, empirical)
        grads = [c.grad for c in calls if c.grad is not None]
        if self._consistency.due(b.name) and grads:
            Jg = J if empirical else shared.jacobian(b.params, calls, m, dtype, True)
            shared.check(b.name, b.params, Jg, m, grads[0].dtype)
            self._consistency.checked.add(b.name)
        b.choice = paths.PathChoice(paths.JACOBIAN, f"explicit J summed over {len(calls)} use(s), shared.py")
        b.uses = [c.name for c in calls]
        return shared.curvature(J, m, damping, b.name)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hyperparams.check_all(self)            # values a scheduler or the user changed count too
        if self.fisher != "empirical" and not self._opt_backward:
            raise TENGraDError(f"fisher={self.fisher!r} needs its own backward passes: use "
                               "out = model(x); opt.zero_grad(); loss = opt.backward(out, y, loss=...); "
                               "opt.step() instead of loss.backward()")
        where = groups.index_of(self.param_groups)
        new_curv: dict[int, woodbury.BlockCurvature] = {}
        skipped: dict[str, str] = {}
        directions: list[tuple[Tensor, Tensor, Tensor, dict]] = []     # (param, d, g, group)
        traces: list[Tensor] = []           # tr(K) / m and 1^T K 1 / m^2 per fresh block (noisescale.py)
        squares: list[Tensor] = []
        fresh: list[str] = []               # their blocks' names (stagger.CycleSums)
        kinds: dict[int, tuple[bool, bool]] = {}   # block -> (uses outside / inside MultiheadAttention)
        sample_rows = self.noise_scale and self.fisher == "empirical"
        rows_m = 0
        device_type = next(p for g in self.param_groups for p in g["params"]).device.type
        op_uses = self._ops.take()
        if self._dist is None and op_uses:
            promoted = promote(self, op_uses)     # fallback parameters read by ops with a spec: blocks
            if promoted:
                where = groups.index_of(self.param_groups)
                self._number_blocks()
                self._due_memo = None
        by_block: dict[int, list] = {}
        owner = {id(p): i for i, b in enumerate(self.blocks) for p in b.params}
        for u in op_uses:
            i = next((owner[id(pt[0])] for pt in u.parts if pt is not None and id(pt[0]) in owner), None)
            if i is not None:
                by_block.setdefault(i, []).append(u)
        try:
            with torch.autocast(device_type=device_type, enabled=False):
                if self._dist is not None:   # every rank gets the same directions, or every rank raises
                    directions = self._dist.directions(self, where, skipped)
                for i, b in enumerate(self.blocks if self._dist is None else ()):
                    group = self.param_groups[groups.group_of_block(b.name, b.param_names, b.params, where)]
                    a, wd = group["damping"], group["weight_decay"]
                    curvature_step = self._block_due(b)    # this step refreshes b (staggered or not)
                    recs = b.capture.take_all() if (curvature_step and b.capture is not None) else []
                    if b.capture is not None:
                        b.capture.clear()
                    uses = by_block.get(i, []) if curvature_step else []
                    if curvature_step:
                        kinds[i] = (any(not u.seq_first for u in uses), any(u.seq_first for u in uses))
                    rec = recs[0] if recs else (uses[0] if uses else None)
                    why = usage.unused(b.params, rec)
                    if why is not None:
                        skipped[b.name] = why
                        continue
                    dtype = woodbury.compute_dtype(b.params[0].dtype)
                    g = [self._gradient(p, wd, dtype) for p in b.params]
                    plain = (b.plan is not None and len(recs) == 1 and not uses
                             and len(b.params) == len([p for _, p in b.plan.params if p.requires_grad]))
                    if curvature_step and (plain or rec is None):
                        curv = self._curvature(b, a, rec)
                    elif curvature_step:
                        curv = self._shared_curvature(b, a, recs, uses)
                    else:
                        curv = b.curv if b.curv.requested == a else woodbury.redamp(b.curv, a, b.name)
                    new_curv[i] = curv
                    if sample_rows and curvature_step and curv.gram.shape[0] == curv.m:
                        traces.append(curv.gram.diagonal().sum().to(torch.float64) / curv.m)
                        squares.append(curv.gram.sum().to(torch.float64) / curv.m ** 2)
                        fresh.append(b.name)
                        rows_m = curv.m
                    d = woodbury.direction(curv, b.plan, g, b.name)
                    directions += [(p, di, gi, group) for p, di, gi in zip(b.params, d, g)
                                   if p.grad is not None]
                for name, p in (self.fallback if self._dist is None else ()):
                    if p.grad is None:
                        continue
                    group = self.param_groups[where[id(p)]]
                    g = self._gradient(p, group["weight_decay"], woodbury.compute_dtype(p.dtype))
                    directions.append((p, g / group["damping"], g, group))
                stepctl.check_finite(directions, self._labels)
        finally:
            self._opt_backward = False
        nu = stepctl.kl_scale(directions, self.kl_clip, self._noise.ratio if self.noise_scale else 1.0)
        self.last_nu = nu
        # commit: nothing above wrote to parameters, buffers or stored curvature
        for i, curv in new_curv.items():
            self.blocks[i].curv = curv
        for i, (outside, inside) in kinds.items():
            self.blocks[i].mode_used, self.blocks[i].mha_used = outside, inside
        if traces and self._cycle is not None:   # staggered: the sums of a whole cycle (stagger.py)
            for name, t, q in zip(fresh, traces, squares):
                self._cycle.add(name, t, q, rows_m)
            sums = self._cycle.take([b.name for b in self.blocks if b.curv is not None])
            if sums is not None:
                self._noise.update(*sums)                     # r for the next step
        elif traces:
            self._noise.update(traces, squares, rows_m)       # r for the next step
        if self._dist is not None:
            self._dist.commit()
        self.skipped = skipped
        stepctl.apply(self, directions, nu)
        self._steps += 1
        self._due_memo = None
        return loss

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """torch's state_dict plus ``sd["tengrad"]`` (steps, parameter names and shapes, kept
        curvature, generator state): see checkpoint.py."""
        sd = super().state_dict()
        sd["tengrad"] = checkpoint.extra(self)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """All or nothing: everything is checked against this optimizer first (checkpoint.py); the
        first mismatch raises a TENGraDError naming it and leaves the optimizer exactly as it was."""
        base, prepared = checkpoint.prepare(self, state_dict)
        own_generator = None if self._dist is None else self._dist.before_load(self)
        super().load_state_dict(base)
        checkpoint.apply(self, prepared)
        self._due_memo = None
        if self._dist is not None:
            self._dist.after_load(self, own_generator)   # curvature recomputed next step; own MC stream
        self.skipped = {}

    def remove_hooks(self) -> None:
        """Detach this optimizer's forward hooks from the model (it can no longer capture curvature)."""
        for b in self.blocks:
            if b.capture is not None:
                b.capture.remove()
        self._ops.remove()
        if self._dist is not None:
            self._dist.batch.remove()
        self._consistency.remove()

    # ------------------------------------------------------------------ printing
    def _noise_note(self) -> str:
        if not self.noise_scale:
            return ""
        if self.fisher != "empirical" or self._dist is not None:
            return " (r=1: the noise ratio needs the empirical Fisher in one process)"
        return f" (r={self._noise.ratio:.3g})"

    def explain(self) -> str:
        gs = self.param_groups

        def hp(g: dict) -> str:
            return (f"lr={g['lr']}, damping={g['damping']}, momentum={g['momentum']}, "
                    f"weight_decay={g['weight_decay']}")

        head = hp(gs[0]) + " (coupled), " if len(gs) == 1 else f"{len(gs)} param groups, "
        lines = [f"TENGraD({head}fisher={self.fisher!r}, update_freq={self.update_freq}, "
                 f"kl_clip={self.kl_clip}, noise_scale={self.noise_scale}{self._noise_note()}, "
                 f"backend={self.backend!r}{', stagger=True' if self.stagger else ''})"]
        if len(gs) > 1:
            lines += [f"  group {i}: {hp(g)}, {len(g['params'])} tensors" for i, g in enumerate(gs)]
        where = groups.index_of(gs)
        for b in self.blocks:
            kind = type(b.module).__name__
            if b.choice is None:
                how = "path undecided (no curvature step yet)"
            else:
                how = f"path={b.choice.path}: {b.choice.note}"
            rows = "" if b.curv is None else f", curvature from m={b.curv.m} (rows={b.curv.gram.shape[0]})"
            grp = f", group {where.get(id(b.params[0]))}" if len(gs) > 1 else ""
            line = f"  block {b.name} ({kind}, {b.numel} params{rows}{grp}) {how}"
            if b.uses:
                line += f"; uses: {', '.join(b.uses)}"
            if b.name in self.skipped:
                line += f"; skipped at the last step: {self.skipped[b.name]}"
            lines.append(line)
        if self.fallback:
            lines.append("  fallback d = g / damping: " + ", ".join(n for n, _ in self.fallback))
        if self._dist is not None:
            lines += self._dist.explain_lines(self)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.explain()


def _batch_dims(batch_dim) -> tuple[int, dict[str, int]]:
    """(dim of the model input holding the batch, {layer name: dim of that layer's input})."""
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, (int, dict)):
        raise TENGraDError(f"batch_dim must be an int or a dict {{layer name: dim}}, got {batch_dim!r}")
    if isinstance(batch_dim, int):
        return batch_dim, {}
    dims = dict(batch_dim)
    for k, v in dims.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise TENGraDError(f"batch_dim: entry {k!r}: {v!r} must map a layer name (str) to a dim >= 0")
    return dims.pop("", 0), dims
