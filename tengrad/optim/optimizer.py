"""The TENGraD optimizer (paper, equation 4, with a block-diagonal Fisher).

Per block (one module's trainable parameters) and step, with g the mean gradient (``param.grad``):

    g   <- g + weight_decay * theta                       (coupled decay, update.py)
    d    = (F + a I)^-1 g = (1/a)(g - R^T (K + m a I)^-1 R g)    (curvature/woodbury.py; R: curvature/fisher.py)
    nu   = min(1, r sqrt(kl_clip / sum_blocks lr_b^2 <d, g>))    (KL clipping, update.py; 1 if kl_clip=None;
                                                                  lr_b: the largest lr so far, so schedules
                                                                  act; r: the gradient-noise ratio, noise.py)
    buf  = momentum * buf + nu d                           (heavy ball, like torch.optim.SGD)
    theta <- theta - lr * buf

Parameters of modules without a layer plan use d = g / a. lr, a, momentum and weight_decay are those
of the block's param group; every hyperparameter is validated at construction and at each step
(options.py).

A step, through the layers of this package (docs/architecture.md):

    capture/    the model's forward and backward leave one ``Use`` per call that read a block's
                parameters (input, output gradients, sample layout, slice)
    estimator/  ``directions``: per block, due (a curvature step) -> curvature/build.py turns its uses
                into Jacobian rows R, curvature/woodbury.py factors K + m a I; not due -> the kept
                factor; d_b = (F_b + a I)^-1 g_b. Single process (LocalEstimator), or torch.distributed
                (ExactEstimator: the global batch's step; AveragedEstimator: own-batch directions
                averaged)
    update.py   finiteness, the KL clip with the noise ratio, momentum, applying the step
    then the estimator commits the new curvature: nothing is written before every check passed, so a
    non-finite gradient, Gram matrix or direction raises naming the layer and leaves parameters,
    momentum buffers and the stored curvature untouched.

Rules a user sees:

* Capture: only forwards with grad enabled, the model (not each module) in training mode, and
  curvature due for the next step are recorded; eval-mode or no_grad forwards never touch the
  captured batch or the stored curvature. Curvature comes from the backward passes since the last
  ``zero_grad()``/``step()``. What is seen is the model's forward and the backward through it; a layer
  called outside it is refused by the consistency check naming the layer (curvature/consistency.py).
* Weight sharing: every use of a block's parameters in the captured forward (module calls, op calls
  outside them, row slices) is one term of the block's J = sum_u J_u (curvature/uses.py); a parameter
  shared by several modules, or a free parameter, starts as fallback and becomes a block at the first
  captured step where an op with a spec reads it (curvature/block.py ``promote``). Gradients
  accumulated over several forwards before a curvature step are refused naming the block.
* update_freq k: steps 0, k, 2k, ... are curvature steps (K, its factor and R from that batch are
  kept); the other steps apply the kept curvature to their fresh gradient. A change of the group's
  damping between curvature steps refactors the kept K. ``stagger=True``: block i refreshes on the
  steps t with (t - i) mod k == 0 instead (estimator/stagger.py).
* A block whose module took no part in this forward is skipped, with the reason in ``opt.skipped``
  and ``explain()`` (curvature/usage.py).
* ``load_state_dict`` is all or nothing (checkpoint.py).
* Gradient from the Jacobian (``grad_from_jacobian``, on by default, single process only): on a
  curvature step of the empirical Fisher, a block that keeps an explicit Jacobian J gets
  ``param.grad`` = J^T 1/m from that J, computed during ``backward()``; autograd's own weight gradient
  of that layer is skipped (capture/module.py). Autograd hooks registered on those parameters'
  gradient accumulators do not fire on such steps; pass ``grad_from_jacobian=False`` if you rely on them.
* The batch m is dimension ``batch_dim`` of the model's first input; each use's sample dimension is
  the one of size m (curvature/uses.py; ambiguous or absent raises), and the loss is mean-reduced
  over the batch. ``batch_dim={"": d, layer: d_layer}`` declares dims per layer.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from tengrad.optim import checkpoint, options, update
from tengrad.optim.capture import ModelCapture
from tengrad.optim.curvature import (conventions, eigenbasis, fisher as fisher_mod, prior as prior_mod, roofline,
                                     woodbury)
from tengrad.optim.curvature.block import (fallback_of, find_blocks, join, op_layout, promote, promote_saved,
                                          refresh, resolve_backend)
from tengrad.optim.curvature.build import Rules, jacobian_grad
from tengrad.optim.curvature.consistency import ConsistencyCheck
from tengrad.optim.errors import TENGraDError
from tengrad.optim.estimator import LocalEstimator, StepInput, agreement, resolve_distributed
from tengrad.optim.explain import describe, fallback_warning


def _rebuilt(model: nn.Module, spec: dict, state_dict: dict) -> "TENGraD":
    """A TENGraD on ``model`` from ``TENGraD._copy_spec()`` (its options and groups by parameter name)
    with ``state_dict`` loaded: what a deep copy or an unpickled optimizer is."""
    params = dict(model.named_parameters(remove_duplicate=False))
    groups = []
    for names, hyper in spec["groups"]:
        missing = [n for n in names if n not in params]
        if missing:
            raise TENGraDError(f"copying TENGraD: the model copy has no parameter {missing[0]!r}")
        groups.append({"params": [params[n] for n in names], **hyper})
    generator = None if spec["generator"] is None else torch.Generator(device=spec["generator"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the fallback warning was given for the original
        opt = TENGraD(model, param_groups=groups, generator=generator, **spec["options"])
    opt.load_state_dict(state_dict)
    return opt


class TENGraD(torch.optim.Optimizer):
    """Time-efficient natural gradient with exact per-layer Fisher blocks.

    Usage (empirical Fisher)::

        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()

    Any Fisher (``fisher`` in "empirical", "mc", "exact")::

        out = model(x); opt.zero_grad(); loss = opt.backward(out, y, loss="cross_entropy"); opt.step()

    Args: ``lr``, ``damping`` (a), ``momentum``, ``weight_decay`` (coupled) are the defaults of the
    param groups and may be changed between steps through ``opt.param_groups`` (LR schedulers work).
    ``param_groups``: torch-style ``[{"params": [...], "lr": ..., "damping": ..., ...}, ...]`` after the
    model; unlisted trainable parameters form a last group with the keyword values (options.py).
    ``update_freq`` k: curvature every k steps. ``fisher``: "empirical", "mc" (one extra backward
    with sampled labels; ``generator`` makes them reproducible, ``opt.last_labels`` holds them) or
    "exact" (one extra backward per output unit). ``backend`` goes
    to ``tengrad.compile`` ("auto" is "torch" on CPU). ``kl_clip``: K-FAC's KL clipping, the step's
    squared damped-Fisher length sum_b lr_b^2 nu^2 <d_b, g_b> is kept <= kl_clip (update.py); None:
    the exact step. ``noise_scale``: shrink that bound to r^2 kl_clip, r = s / max(s so far) with
    s = |G|^2 / E|g|^2 the share of the batch gradient that is signal, estimated from the per-sample
    rows of the curvature steps (noise.py; empirical Fisher, single process; False: r = 1).

    Defaults (``TENGraD(model)``): prior "soap" with step_rule "adam" (SOAP's step around the rows, below),
    lr 3e-3, damping 0.1, momentum 0.95, update_freq 10, no KL clip: ahead of the paper's step on all three
    tasks of benchmarks/tta.py (3C1F, a BatchNorm ResNet, a Transformer LM; benchmarks/README.md,
    docs/experiments/lm-prior-soap.md). The paper's step, ``TENGraD(model, prior=None)``: lr 0.3,
    damping 1, momentum 0.9, kl_clip 6.4e-3 with the noise ratio (options.resolve_rule; chosen with
    benchmarks/robustness.py and benchmarks/tta.py, docs/experiments/robustness.md and
    docs/experiments/time-to-accuracy.md). ``lr``, ``damping``, ``momentum`` None and ``kl_clip`` "auto"
    take the defaults of the step rule in use; ``step_rule`` "auto" is "adam" for prior="soap" without a
    KL clip, else "natural".
    ``max_jacobian_numel``: the largest explicit per-layer Jacobian (rows x params) a block may keep.
    ``max_exact_fisher_bytes``: ``fisher="exact"`` estimates what a curvature step allocates (its C
    output passes, and per block K and its factor, (C m)^2 each; curvature/fisher.py ``exact_bytes``)
    and refuses above this many bytes (default 2 GiB), before any pass runs.
    ``check``: verify J^T 1 / m == param.grad and the batch dimension per block (one vjp per block)
    on its first curvature step (False), on every curvature step (True) or never (None); unless None,
    every curvature step also screens for a gradient part the rows do not explain, a gradient penalty
    (curvature/consistency.py ``screen``: no extra product with R).
    ``opt.explain()`` (also ``repr``) lists each block, its path choice and the fallback parameters.
    ``curvature_batch``: "auto" (default: every row of the batch, fewer when the memory budget needs
    it or when a reuse step's products, priced by the roofline, would cost over 0.07 of the layers'
    forward and backward: curvature/budget.py ``time_rows``), None (every row, always) or c: each curvature step samples min(c, m) of its m rows (the same
    rows for every block, ``generator`` or torch's, kept in ``opt.last_curvature_rows``); the step is the
    exact damped step of the Fisher of those rows and the gradient is the whole batch's (single process).
    ``curvature_memory``: "auto" (default: half the model's training memory as a step sees it,
    parameters + gradients + the captured layer inputs, at least 16 MiB), None (no cap) or a number of
    bytes: a budget for the curvature kept between steps. Blocks that would keep an explicit J are
    moved to x and gy, the largest saving first, until the kept curvature fits; with
    ``curvature_batch="auto"`` the rows are then cut to fit (curvature/budget.py). Moving a block leaves
    the step unchanged (reuse steps read x and gy instead of J); cutting rows makes it the step of the
    sampled rows' Fisher. Pass ``curvature_batch=None`` for the whole batch's Fisher at any memory.
    ``prior``: None (the paper's step: the damping a I outside the rows) or "adam": (F + a D)^-1 g with D the
    diagonal of Adam's second moments (decay ``prior_beta``, default 0.999), normalised to mean 1 per
    block and floored at ``prior_floor`` (curvature/prior.py: the exact step for that D;
    Kronecker-diagonal on Linear and Conv x/gy rows, so their Gram keeps the reuse form); or "soap" (the
    default): D = Q diag(delta) Q^T per weight, Q the eigenbasis of Shampoo's factors (E[G G^T], E[G^T G])
    and delta Adam's second moments of the rotated gradient (decay ``prior_beta``, default SOAP's 0.95),
    as SOAP preconditions (curvature/eigenbasis.py: exact for that D; the rows of such a block are kept
    as a rotated explicit J; a weight whose eigenbasis would cost more than its layer keeps the diagonal). On several ranks the global gradient is written into
    param.grad (as DDP does), so the moments and D are the same on every rank; "exact" then steps
    (F + a D)^-1 g for the global batch's rows, "local" averages each rank's step for its own rows.
    ``step_rule``: "natural" (the KL-clipped step d = (F + a D)^-1 g with heavy-ball momentum) or
    "adam" (the default, through "auto"), SOAP's step around the rows (needs prior="soap" and
    kl_clip=None): the solve preconditions
    Adam's first moment m = EMA_momentum(g) / (1 - momentum^t) in place of g, D is taken from v with this
    step's gradient folded in, each block's d is scaled by a / mean_b sqrt(v) so that outside the rows the
    step is m'' / sqrt(v) per rotated coordinate (SOAP's, at lr), and theta -= lr d with no heavy ball:
    d = (F mean_b / a + Q diag(max(sqrt v, floor mean_b)) Q^T)^-1 m (curvature/prior.py's adam_scale);
    a weight too wide for the eigenbasis takes Adafactor's factored sqrt(v) in place of Q diag(sqrt v) Q^T,
    a block whose J is too large mean_b I; each block's d is then clipped to RMS <= 1 (Adafactor's update
    clipping: D is kept between curvature steps while v moves); before a block's first statistics
    d = (F + a I)^-1 m; outside every block Adam's step, m / max(sqrt v, floor mean sqrt v), clipped alike.
    lr is then SOAP's (e.g. 3e-3) and momentum its beta1 (e.g. 0.95)
    (docs/experiments/lm-prior-soap.md, "Momentum").
    ``token_rows``: None (default: one row per sample) or c: a block whose layer input carries token
    dimensions besides the sample (Linear, LayerNorm, Embedding on [m, T, ...], MultiheadAttention's
    projections, a tied head) takes rows per position instead, the Fisher (1/m) sum_{i,t} j_it j_it^T of
    the positions (cross-position terms dropped), estimated from min(c, m T) positions drawn per curvature
    step (the same for every block of that layout; ``opt.last_curvature_rows[(m, T)]``, None: all), so its
    Gram is c x c (curvature/tokens.py). Other blocks keep sample rows (``curvature_batch`` applies to
    them). The memory budget and the time rule price sample rows, so with token_rows "auto" means None
    for ``curvature_batch`` and ``curvature_memory``; single process, empirical or "mc" Fisher.
    ``stagger``: False (default): every block refreshes its curvature on steps 0, k, 2k, ...; True:
    block i on steps t with (t - i) mod k == 0, so every step captures about 1/k of the blocks
    (estimator/stagger.py; empirical Fisher, one process).
    ``distributed``: "auto" ("exact" inside an initialised torch.distributed group of several ranks),
    "exact" (the single-process step on the global batch), "local" (own-batch curvature, directions
    averaged: an approximation) or None; see estimator/distributed.py.
    """

    def __init__(self, model: nn.Module, lr: float | None = None,
                 damping: float | None = None, momentum: float | None = None,
                 weight_decay: float = 0.0, update_freq: int = options.DEFAULT_UPDATE_FREQ,
                 fisher: str = "empirical", backend: str = "auto",
                 kl_clip: float | str | None = "auto",
                 generator: torch.Generator | None = None, max_jacobian_numel: int = 2 ** 26,
                 param_groups: list[dict] | None = None, check: bool | None = False,
                 distributed: str | None = "auto", batch_dim: int | dict = 0,
                 grad_from_jacobian: bool = True, noise_scale: bool = True, stagger: bool = False,
                 max_exact_fisher_bytes: int = fisher_mod.DEFAULT_MAX_EXACT_BYTES,
                 curvature_batch: int | str | None = "auto", curvature_memory: int | str | None = "auto",
                 prior: str | None = "soap", prior_beta: float | None = None,
                 prior_floor: float = prior_mod.DEFAULT_FLOOR, token_rows: int | None = None,
                 step_rule: str = "auto") -> None:
        model = options.check_model(model)
        step_rule, kl_clip, lr, damping, momentum = options.resolve_rule(prior, step_rule, kl_clip, lr, damping,
                                                                         momentum)
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        for key, value in defaults.items():
            options.check_value(key, value)
        options.check_options(fisher, update_freq, kl_clip, max_jacobian_numel, generator)
        self.noise_scale = options.check_bool("noise_scale", noise_scale)
        self.max_exact_fisher_bytes = options.check_count("max_exact_fisher_bytes", max_exact_fisher_bytes)
        self.stagger = options.check_bool("stagger", stagger)
        if stagger and fisher != "empirical":
            raise TENGraDError(f"stagger=True needs fisher='empirical', not {fisher!r}: the {fisher} Fisher runs "
                               "extra backward passes on every curvature step, which staggered is every step")
        dist_estimator = resolve_distributed(distributed, model)       # None: single process
        if stagger and dist_estimator is not None:
            raise TENGraDError("stagger=True is single-process only: the distributed step decides curvature "
                               "steps for all ranks together (estimator/distributed.py)")
        groups_given = options.build_groups(model, param_groups)
        if not any(p.requires_grad for g in groups_given for p in g["params"]):
            raise TENGraDError("the model has no trainable parameters")
        super().__init__(groups_given, defaults)
        self.model = model
        self.fisher = fisher
        self.update_freq = int(update_freq)
        self.kl_clip = kl_clip
        self.generator = generator
        self._given = dict(backend=backend, check=check, batch_dim=batch_dim, grad_from_jacobian=grad_from_jacobian,
                           stagger=stagger)   # what a copy is built with (``_copy_spec``)
        self.max_jacobian_numel = int(max_jacobian_numel)
        self.curvature_batch = options.check_curvature_batch(curvature_batch)
        self.curvature_memory = options.check_curvature_memory(curvature_memory)
        self.prior, self.prior_beta, self.prior_floor = options.check_prior(prior, prior_beta, prior_floor)
        self.step_rule = options.check_step_rule(step_rule, self.prior, kl_clip)
        moments = prior_mod.SecondMoments(self.prior_beta)
        self._moments = (None if self.prior is None else moments if self.prior == "adam"
                         else eigenbasis.EigenMoments(self.prior_beta, moments))
        self.token_rows = options.check_token_rows(token_rows, fisher, dist_estimator is not None)
        # "auto" (the defaults): the single-process step's memory budget; the distributed step keeps every
        # row in the forms its exchange plan chooses
        if self.curvature_memory not in (None, "auto") and dist_estimator is not None:
            raise TENGraDError("curvature_memory is single-process only: the distributed step places rows and "
                               "factors by its own exchange plan (estimator/owners.py)")
        if self.curvature_batch not in (None, "auto") and dist_estimator is not None:
            raise TENGraDError("curvature_batch is single-process only: the distributed step's rows are the "
                               "ranks' whole batches (estimator/distributed.py)")
        # gradient from the Jacobian: single process and empirical Fisher only (distributed ranks reduce
        # gradients through their own hooks)
        # ... and without a given curvature batch: J is then formed for the sampled rows only, after the
        # backward, so the gradient comes from autograd (so on the steps "auto" samples: build.py)
        self.grad_from_jacobian = (bool(grad_from_jacobian) and fisher == "empirical" and dist_estimator is None
                                   and self.curvature_batch in (None, "auto") and self.token_rows is None)
        self.distributed = dist_estimator is not None
        self.estimator = dist_estimator or LocalEstimator(staggered=stagger, noise=noise_scale)
        self.backend = resolve_backend(model, backend)
        # the roofline (curvature/roofline.py) is measured now, before training: its 64 MiB read buffer
        # then never sits on top of a curvature step's captured tensors (the process's peak memory)
        roofline.measured(next(p for g in self.param_groups for p in g["params"]).device)
        # op-only blocks (MultiheadAttention's projections) are single-process only: the distributed
        # step needs a module plan per block
        self.blocks, self.fallback, self.fallback_why = find_blocks(model, self.backend, not self.distributed)
        where = options.index_of(self.param_groups)
        for b in self.blocks:          # a block straddling groups is refused now, not at step()
            if b.params:
                options.group_of_block(b.name, b.param_names, b.params, where)
        self.batch_dim, self.layer_dims = options.batch_dims(batch_dim)
        self._steps = 0
        self._opt_backward = False
        self._row_factor = 1.0                   # rows' factor for the loss convention (opt.backward)
        self.skipped: dict[str, str] = {}        # block name -> why the last step left it alone
        self.last_labels: Tensor | None = None   # labels drawn by the last opt.backward (fisher="mc")
        self.last_nu = 1.0                       # the KL-clipping factor of the last step (update.py)
        self._capture = ModelCapture(
            model, self.blocks, self.fallback, armed=self._curvature_due, block_due=self._block_due,
            due_blocks=self._due_blocks if stagger else None, batch_dim=self.batch_dim,
            keep_edges=fisher != "empirical", on_jacobian_grad=jacobian_grad)
        # J^T 1/m == grad, batch dim; its forward hook is a capture hook (off on reuse steps)
        self._check = ConsistencyCheck(model, check, self.batch_dim, hooks=self._capture.hooks)
        self._check.names = {b.name for b in self.blocks}
        self._labels_for_blocks()
        if self.distributed:          # every rank the same model, parameters and settings, or all raise
            self.estimator.agree([p for g in self.param_groups for p in g["params"]], self._settings(),
                                 self.param_groups[0]["params"][0].device)
        trainable_fallback = [(n, p) for n, p in self.fallback if p.requires_grad]
        if trainable_fallback:
            warnings.warn(fallback_warning(model, trainable_fallback, self.fallback_why), stacklevel=2)

    def add_param_group(self, param_group: dict) -> None:
        """Groups are fixed at construction (``param_groups=``): the blocks and hooks are built from the
        model then, so a group added later would hold parameters that no block or fallback updates."""
        if hasattr(self, "blocks"):
            raise TENGraDError("add_param_group after construction is not supported: pass "
                               "param_groups=[{'params': [...], ...}, ...] to TENGraD(model, ...)")
        super().add_param_group(param_group)

    def _labels_for_blocks(self) -> None:
        self._labels = {id(p): f"layer {b.name!r}" for b in self.blocks for p in b.params}
        self._labels.update({id(p): f"parameter {n!r}" for n, p in self.fallback})

    def _settings(self) -> list:
        """The hyperparameters every rank must share (estimator/agreement.py)."""
        return agreement.settings(self.param_groups, dict(
            fisher=self.fisher, update_freq=self.update_freq, kl_clip=self.kl_clip, noise_scale=self.noise_scale,
            max_jacobian_numel=self.max_jacobian_numel, mode=self.estimator.mode, prior=self.prior,
            prior_beta=self.prior_beta, prior_floor=self.prior_floor, step_rule=self.step_rule))

    # ------------------------------------------------------------------ when curvature is captured
    def _block_due(self, b) -> bool:
        return self.estimator.due(b, self._steps, self.update_freq)

    def _curvature_due(self) -> bool:
        return self.estimator.curvature_due(self.blocks, self._steps, self.update_freq)

    def _due_blocks(self) -> list:
        return self.estimator.due_blocks(self.blocks, self._steps, self.update_freq)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and forget the output gradients captured since the last step; a change of
        ``requires_grad`` since the last step is taken in here (the next forward captures the new set)."""
        super().zero_grad(set_to_none=set_to_none)
        self._row_factor, self._opt_backward = 1.0, False
        self._capture.clear()
        self._refresh_trainable()

    def _refresh_trainable(self) -> set[str]:
        """Re-read ``requires_grad`` for every block (curvature/block.py ``refresh``); the names of the
        blocks whose trainable set changed. A parameter that trains now but is in no param group (added
        or replaced after construction) is refused naming it."""
        changed = [b for b in self.blocks if refresh(b, self.backend)]
        if not changed:
            return set()
        for b in changed:
            self._capture.rewire(b)
            self._check.forget(b.name)
            self.estimator.drop(b.name)
        self.fallback = fallback_of(self.model, self.blocks)
        self._capture.set_fallback(self.fallback)
        self._labels_for_blocks()
        where = options.index_of(self.param_groups)
        for b in changed:
            missing = [n for n, p in zip(b.param_names, b.params) if id(p) not in where]
            if missing:
                raise TENGraDError(f"layer {b.name!r}: parameter(s) {missing} train but are in no param group: "
                                   "they were added or replaced after TENGraD was built; build the optimizer "
                                   "again for the new parameters")
            if b.params:
                options.group_of_block(b.name, b.param_names, b.params, where)
        self.estimator.forget()
        return {b.name for b in changed}

    # ------------------------------------------------------------------ backward for any Fisher
    def backward(self, out: Tensor, y: Tensor, loss: str | Callable = "cross_entropy",
                 generator: torch.Generator | None = None, *, ignore_index: int = -100,
                 reduction: str = "mean") -> Tensor:
        """Run the backward passes this optimizer's Fisher needs; returns the (detached) loss.

        The loss gradient (true labels ``y``) always goes into ``param.grad``. When curvature is due,
        "mc" adds one backward with labels drawn from the model (``generator`` or the optimizer's,
        kept in ``opt.last_labels``) and "exact" one backward per output unit (curvature/fisher.py);
        those extra passes only feed the captures (they stop at the layer outputs: no weight gradients).

        ``ignore_index`` (cross_entropy) and ``reduction`` ("mean", "sum") are passed to the loss, and the
        Fisher follows them (curvature/conventions.py): the mean over the samples with a counted label,
        or the sum over samples for "sum" (empirical Fisher, one process, one call per step).
        """
        name, loss_fn = fisher_mod.resolve_loss(loss)
        if (name == "cross_entropy" and not callable(loss) and out.dim() >= 3 and y.dim() == out.dim() - 1
                and tuple(out.shape[:-1]) == tuple(y.shape) and tuple(out.shape[2:]) != tuple(y.shape[1:])):
            raise TENGraDError(f"opt.backward: cross_entropy takes the classes on dim 1 (out [N, C, ...] for y "
                               f"[N, ...]), but out {tuple(out.shape)} has them last for y {tuple(y.shape)}: "
                               "pass out.movedim(-1, 1) (nothing was changed)")
        if self.fisher != "empirical" and callable(loss):
            raise TENGraDError(f"fisher={self.fisher!r} needs loss 'cross_entropy' or 'mse', not a callable")
        m = int(out.shape[0]) if out.dim() else 1
        counted = conventions.counted_samples(y, m, ignore_index if name == "cross_entropy" else None)
        factor = conventions.row_factor(m, counted, reduction)
        if callable(loss) and reduction != "mean":
            raise TENGraDError("opt.backward(..., reduction=) applies to loss 'cross_entropy' or 'mse'; a "
                               "callable loss is taken as a mean over the batch")
        several = self._row_factor != 1.0 or (factor != 1.0 and self._opt_backward)
        if factor != 1.0 or several:
            where = ("fisher='empirical'" if self.fisher != "empirical" else "one process" if self.distributed
                     else "one opt.backward per step (no accumulation)" if several else None)
            if where is not None:
                raise TENGraDError(f"opt.backward with {m - counted} of {m} samples ignored or reduction="
                                   f"{reduction!r} is supported with {where} only (curvature/conventions.py)")
        kwargs = {"reduction": reduction} | ({"ignore_index": ignore_index} if name == "cross_entropy" else {})
        value = loss_fn(out, y, **kwargs) if not callable(loss) else loss_fn(out, y)
        self._row_factor = factor
        if self.fisher != "empirical" and self._curvature_due():
            if self.fisher == "mc":
                self.last_labels = fisher_mod.sample_labels(out, name, generator or self.generator)
                vs = fisher_mod.mc_grad_outputs(out, loss_fn, self.last_labels)
            else:
                due = [b for b in self.blocks if b.params and self._block_due(b)]
                itemsize = max((torch.promote_types(b.params[0].dtype, torch.float32).itemsize for b in due),
                               default=4)
                fisher_mod.check_exact_memory(out, len(due), itemsize, self.max_exact_fisher_bytes)
                vs = fisher_mod.exact_grad_outputs(out, name)
            # differentiate w.r.t. the layer outputs' gradient edges: the hooks see gy, and no
            # weight gradient is computed (parameters are the fallback on torch without edges)
            inputs = self._capture.edges() or [p for b in self.blocks for p in b.params]

            def passes() -> None:
                for v in vs:
                    torch.autograd.grad(out, inputs, grad_outputs=v, retain_graph=True, allow_unused=True)

            self._capture.curvature_passes(passes)
        value.backward()
        self._opt_backward = True
        return value.detach()

    # ------------------------------------------------------------------ the step
    def _rules(self) -> Rules:
        device = next(p for g in self.param_groups for p in g["params"]).device
        # "auto" budgets the single-process step of sample rows only
        auto = not self.distributed and self.token_rows is None
        return Rules(self.fisher, self.update_freq, self.max_jacobian_numel, self.grad_from_jacobian,
                     self.layer_dims, roofline.measured(device),
                     self.curvature_batch if auto or self.curvature_batch != "auto" else None, self.generator,
                     self.curvature_memory if auto or self.curvature_memory != "auto" else None,
                     None if self.prior is None else prior_mod.Prior(
                         self.prior, self.prior_floor, self.state,
                         self.prior_beta if self.step_rule == "adam" else None),
                     self.token_rows)

    @property
    def last_curvature_rows(self) -> dict | None:
        """{m: the sampled row indices [c]} of the last curvature step with ``curvature_batch``, and
        {(m, T): the sampled flat positions i T + t [c], or None for all} with ``token_rows``; else None."""
        return getattr(self.estimator, "last_rows", None)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        options.check_all(self.fisher, self.update_freq, self.kl_clip, self.max_jacobian_numel,
                          self.generator, self.param_groups)     # values a scheduler or the user changed
        # several ranks: the step's status all-gather names an empty rank on every rank (a local raise
        # here would leave the other ranks in a collective this rank never joins)
        if self._capture.last_batch == 0 and not self.distributed:
            raise TENGraDError(f"the last training forward had a batch of 0 samples (dimension {self.batch_dim} "
                               "of the model input): there is no gradient to precondition; skip empty batches "
                               "(nothing was changed)")
        if self.fisher != "empirical" and not self._opt_backward:
            raise TENGraDError(f"fisher={self.fisher!r} needs its own backward passes: use "
                               "out = model(x); opt.zero_grad(); loss = opt.backward(out, y, loss=...); "
                               "opt.step() instead of loss.backward()")
        changed = self._refresh_trainable()       # requires_grad changed since zero_grad()
        op_uses = self._capture.take_ops()
        if not self.distributed and op_uses:      # fallback parameters read by ops with a spec: blocks
            new, self.fallback = promote(self.model, self.blocks, self.fallback, op_uses)
            if new or len(self.fallback) != len(self._capture.fallback):
                self._capture.set_fallback(self.fallback)
                self._labels_for_blocks()
        where = options.index_of(self.param_groups)
        uses = self._capture.take(op_uses, self._block_due)
        adam = self.step_rule == "adam"
        firsts: dict = {}       # step_rule="adam": {id(p): (m, t, m_hat)}, kept once the step commits

        def first_moments() -> dict:
            firsts.update(self._first_moments())
            return {k: m_hat for k, (_, _, m_hat) in firsts.items()}
        # several ranks: Adam's m of the global gradient, which the estimator puts in param.grad mid-step
        inputs = StepInput(self._steps, self.update_freq, self.blocks, self.fallback, self.param_groups,
                           where, uses, self._rules(), self._check, frozenset(changed), self._row_factor,
                           self._settings() if self.distributed else None,
                           first_moments() if adam and not self.distributed else None, adam,
                           first_moments if adam and self.distributed else None)
        skipped: dict[str, str] = {}
        device_type = next(p for g in self.param_groups for p in g["params"]).device.type
        try:
            with torch.autocast(device_type=device_type, enabled=False):
                directions = self.estimator.directions(inputs, skipped)   # every rank the same, or raises
                products = self.estimator.products(directions) if directions else None   # <d, g>, used twice
                update.check_finite(directions, self._labels, products)
        finally:
            self._opt_backward, self._row_factor = False, 1.0
        nu = update.kl_scale(directions, self.kl_clip, self.estimator.noise_ratio if self.noise_scale else 1.0,
                             products)
        # commit: nothing above wrote to parameters, buffers or stored curvature
        self.last_nu = nu
        self.estimator.commit()
        self._capture.commit()
        self.skipped = skipped
        update.apply(self.state, directions, nu, heavy_ball=not adam)
        for p, _, _, _ in directions if adam else ():     # Adam's m, kept with the step
            m, t, _ = firsts[id(p)]
            self.state[p]["exp_avg"], self.state[p]["exp_avg_steps"] = m, t
        if self._moments is not None:     # v for the prior's next curvature step (curvature/prior.py)
            self._moments.update(self.state, [p for p, _, _, _ in directions],
                                 lambda dt: torch.promote_types(dt, torch.float32), self._steps)
        self._steps += 1
        return loss

    def _first_moments(self) -> dict:
        """step_rule="adam": {id(p): (m, t, m / (1 - momentum^t))} for every parameter with a gradient,
        m = momentum m + (1 - momentum) g (g with weight decay, update.gradient; from m_0 = 0), as new
        tensors: the state takes them only once the step is committed. Parameters of one group, count t
        and dtype in three foreach ops (m as a lerp from the kept m towards g)."""
        out, batches = {}, {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = update.gradient(p, group["weight_decay"], woodbury.compute_dtype(p.dtype))
                st = self.state[p]
                t = st.get("exp_avg_steps", 0) + 1
                key = (gi, t, g.dtype, "exp_avg" in st)
                batches.setdefault(key, []).append((p, g, st.get("exp_avg")))
        for (gi, t, _, kept), items in batches.items():
            beta = self.param_groups[gi]["momentum"]
            gs = [g for _, g, _ in items]
            ms = (torch._foreach_lerp([m for _, _, m in items], gs, 1.0 - beta) if kept
                  else torch._foreach_mul(gs, 1.0 - beta))
            hats = torch._foreach_div(ms, 1.0 - beta ** t)
            for (p, _, _), m, m_hat in zip(items, ms, hats):
                out[id(p)] = (m, t, m_hat)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """torch's state_dict plus ``sd["tengrad"]`` (steps, parameter names and shapes, kept
        curvature, generator state, noise statistics): see checkpoint.py."""
        sd = super().state_dict()
        sd["tengrad"] = checkpoint.extra(self._steps, checkpoint.param_names(self.model, self.param_groups),
                                         self.param_groups, self.estimator.state(self.blocks), self.generator,
                                         op_layout(self.blocks))
        sd["tengrad"]["rule"] = {"prior": self.prior, "step_rule": self.step_rule}   # checked on load
        # the input shapes whose weight gradient the next curvature step takes from the Jacobian (capture/
        # module.py): without them a resumed run takes autograd's once, a rounding apart from the saved run's
        sd["tengrad"]["jacobian_grad"] = {b.name: list(b.capture.jacobian_grad_shape) for b in self.blocks
                                          if b.capture is not None and b.capture.jacobian_grad_shape is not None}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """All or nothing: everything is checked against this optimizer first (checkpoint.py); the
        first mismatch raises a TENGraDError naming it and leaves the optimizer exactly as it was."""
        # op-level blocks the saved optimizer had built at its steps (``x * w``, addmm, einsum: block.promote)
        # are built here too, so their kept curvature has a block before this optimizer's first forward
        # (single process only: the distributed step keeps such parameters on d = g / a, as its steps do)
        checkpoint.check_rule(state_dict, self.prior, self.step_rule)
        ours = state_dict.get("tengrad") if isinstance(state_dict, dict) and not self.distributed else None
        new, joined, fallback = promote_saved(self.model, self.blocks, self.fallback,
                                              ours.get("op_blocks") if isinstance(ours, dict) else None)
        copies = {b.name: b for b in joined}
        base, prepared = checkpoint.prepare(state_dict, self.param_groups,
                                            checkpoint.param_names(self.model, self.param_groups),
                                            [copies.get(b.name, b) for b in self.blocks] + new, self.generator)
        # distributed: each rank keeps its own Monte-Carlo stream (rank 0's would make every rank draw
        # the same labels); the curvature is recomputed at the next step on every rank
        own_generator = self.generator.get_state() if self.distributed and self.generator is not None else None
        super().load_state_dict(base)
        self._compute_dtype_state(base)
        self._steps = prepared["steps"]
        if new or joined:       # checked: commit the blocks as a step's promotion does
            for b in self.blocks:
                if b.name in copies:
                    join(b, copies[b.name])
            self.blocks.extend(new)
            self.fallback = fallback
            self._capture.set_fallback(self.fallback)
            self._labels_for_blocks()
        self.estimator.load(self.blocks, prepared)
        for b in self.blocks if self.grad_from_jacobian else ():     # (this optimizer's own rule decides)
            if b.capture is not None and b.name in prepared["jacobian_grad"]:
                b.capture.set_jacobian_grad(prepared["jacobian_grad"][b.name])
        if prepared["generator"] is not None and self.generator is not None:
            self.generator.set_state(own_generator if own_generator is not None else prepared["generator"])
        self.skipped = {}

    def _compute_dtype_state(self, base: dict) -> None:
        """Every per-parameter state tensor (momentum, Adam's m, the prior's v, factors and bases) in the
        compute dtype again, from the state_dict's own values: torch's load casts them to the parameter's
        dtype, which for a bf16 / fp16 parameter rounds them and breaks the float32 products of the next
        step (the eigenbasis factors' addmm raised on a dtype mismatch)."""
        saved = [i for g in base["param_groups"] for i in g["params"]]
        for i, p in zip(saved, (p for g in self.param_groups for p in g["params"])):
            dtype = woodbury.compute_dtype(p.dtype)
            for key, value in base["state"].get(i, {}).items():
                if torch.is_tensor(value) and value.is_floating_point() and value.dtype != self.state[p][key].dtype:
                    self.state[p][key] = value.to(device=p.device, dtype=dtype)

    # ------------------------------------------------------------------ copies
    def _copy_spec(self) -> dict:
        """What rebuilds this optimizer on a copy of its model (``_rebuilt``): the options as they stand,
        and each param group as its parameters' names and hyperparameters."""
        if self.distributed:
            raise TENGraDError("copying or pickling a distributed TENGraD is not supported: every rank builds "
                               "its own; save opt.state_dict() and load it into TENGraD(model, ...) on each rank")
        names = checkpoint.param_names(self.model, self.param_groups)
        groups, k = [], 0
        for g in self.param_groups:
            groups.append((names[k:k + len(g["params"])], {key: g[key] for key in options.GROUP_KEYS if key in g}))
            k += len(g["params"])
        opts = dict(self.defaults, update_freq=self.update_freq, fisher=self.fisher, kl_clip=self.kl_clip,
                    max_jacobian_numel=self.max_jacobian_numel, noise_scale=self.noise_scale,
                    max_exact_fisher_bytes=self.max_exact_fisher_bytes, curvature_batch=self.curvature_batch,
                    curvature_memory=self.curvature_memory, prior=self.prior, prior_beta=self.prior_beta,
                    prior_floor=self.prior_floor, token_rows=self.token_rows, step_rule=self.step_rule,
                    distributed=None, **self._given)
        return {"options": opts, "groups": groups,
                "generator": None if self.generator is None else str(self.generator.device)}

    def __deepcopy__(self, memo):
        """A working optimizer on ``copy.deepcopy(opt.model, memo)`` (so ``copy.deepcopy((model, opt))``
        pairs the model copy with the optimizer copy) with this one's state loaded: it steps exactly as
        this one would. (A copy of the model alone is a plain model: capture/hooks.py ``OwnHook``.)"""
        spec = self._copy_spec()
        return _rebuilt(copy.deepcopy(self.model, memo), spec, self.state_dict())

    def __copy__(self):
        raise TENGraDError("copy.copy(opt) would be a second optimizer hooked to the same model: use "
                           "copy.deepcopy((model, opt)) for a model and optimizer pair, or opt.state_dict()")

    def __reduce_ex__(self, protocol):
        """Pickled (``torch.save(opt)``) as its model, options and ``state_dict()``; loaded,
        it is a TENGraD on the unpickled model (the same object when pickled together with it)."""
        return _rebuilt, (self.model, self._copy_spec(), self.state_dict())

    def remove_hooks(self) -> None:
        """Detach this optimizer's hooks from the model (it can no longer capture curvature)."""
        self._capture.remove()
        self.estimator.remove()
        self._check.remove()

    # ------------------------------------------------------------------ printing
    def _noise_note(self) -> str:
        if not self.noise_scale:
            return ""
        if self.kl_clip is None:
            return " (unused: no KL clip to scale)"
        if self.fisher != "empirical" or self.distributed:
            return " (r=1: the noise ratio needs the empirical Fisher in one process)"
        return f" (r={self.estimator.noise_ratio:.3g})"

    def _rule_note(self) -> str:
        if self.step_rule == "natural":
            return ""
        return f", step_rule={self.step_rule!r} (SOAP-scaled d of Adam's m, no heavy ball)"

    def explain(self) -> str:
        settings = (f"fisher={self.fisher!r}, update_freq={self.update_freq}, kl_clip={self.kl_clip}, "
                    f"noise_scale={self.noise_scale}{self._noise_note()}, backend={self.backend!r}"
                    f"{', stagger=True' if self.stagger else ''}"
                    f"{f', token_rows={self.token_rows}' if self.token_rows is not None else ''}"
                    f"{f', prior={self.prior!r}' if self.prior is not None else ''}"
                    f"{self._rule_note()}")
        return describe(settings, self.param_groups, self.blocks, self.fallback, self.skipped,
                        self.estimator.explain_lines(self.blocks))

    def __repr__(self) -> str:
        return self.explain()
