"""The TENGraD optimizer (paper, equation 4, with a block-diagonal Fisher).

Per block (one module's trainable parameters) and step, with g the mean gradient (``param.grad``):

    g   <- g + weight_decay * theta                       (coupled decay, see below)
    d    = (F + a I)^-1 g = (1/a)(g - R^T (K + m a I)^-1 R g)      (woodbury.py; R, F: fisher.py)
    nu   = min(1, sqrt(kl_clip / (lr^2 sum_blocks <d, g>)))   (KL clipping, stepctl.py; 1 if kl_clip=None)
    buf  = momentum * buf + nu d                           (heavy ball, like torch.optim.SGD)
    theta <- theta - lr * buf

Parameters of modules without a layer plan use d = g / a.

Decisions:

* Weight decay is *coupled*: it is added to g before preconditioning, so the step is the damped natural
  gradient of loss + (weight_decay/2)||theta||^2 and the oracle (F + a I)^-1 (g + wd theta) holds exactly.
* Capture (capture.py): only forwards with grad enabled, ``module.training`` true, and curvature due for
  the next step are recorded; eval-mode or no_grad forwards never touch the captured batch or the stored
  curvature. Curvature comes from the backward passes since the last ``zero_grad()``/``step()``.
* Weight sharing: a module called more than once in a forward is refused at the next curvature
  ``step()`` with an error naming it; a parameter shared by several modules (tied weights) makes
  those modules fall back to d = g / a, with a warning.
* update_freq k: steps 0, k, 2k, ... are curvature steps (K, its Cholesky factor and R from that batch are
  kept); the other steps apply the kept curvature to their fresh gradient. A change of the group's
  damping between curvature steps refactors the kept K.
* Every direction is computed (and checked finite, once for the whole step: one sum per tensor, and
  only if one of those is not finite an element-wise search for the culprit) before anything is
  written: a non-finite gradient, Gram matrix or direction raises an error naming the layer and leaves
  parameters, momentum buffers and the stored curvature untouched.
* Gradient from the Jacobian (``grad_from_jacobian``, on by default): on a curvature step of the
  empirical Fisher, a block that keeps an explicit Jacobian J (paths.py) gets ``param.grad`` = J^T 1/m
  from that J, computed during ``backward()``; autograd's own weight gradient of that layer, which
  would cost as much again, is skipped (capture.py). Autograd hooks registered on those parameters'
  gradient accumulators do not fire on such steps; pass ``grad_from_jacobian=False`` if you rely on them.
* The batch is dimension 0 of every layer input and output, and the loss is mean-reduced over it.
"""
from __future__ import annotations

import warnings
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from tengrad.optim import fisher as fisher_mod
from tengrad.optim import paths, stepctl, woodbury
from tengrad.optim.blocks import Block, find_blocks, resolve_backend
from tengrad.optim.capture import CURVATURE, GRADIENT, LayerCapture
from tengrad.optim.errors import TENGraDError


class TENGraD(torch.optim.Optimizer):
    """Time-efficient natural gradient with exact per-layer Fisher blocks.

    Usage (empirical Fisher)::

        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()

    Any Fisher (``fisher`` in "empirical", "mc", "exact")::

        out = model(x); opt.zero_grad(); loss = opt.backward(out, y, loss="cross_entropy"); opt.step()

    Defaults (``TENGraD(model)``): lr 0.3, damping 1, momentum 0.9, update_freq 10, kl_clip 1e-2,
    chosen from the lr x damping grid of benchmarks/robustness.py (README: "Choosing lr, damping and
    update_freq").

    Args: ``lr``, ``damping`` (a), ``momentum``, ``weight_decay`` (coupled) live in the single param
    group and may be changed between steps. ``update_freq`` k: curvature every k steps. ``fisher``:
    "empirical", "mc" (one extra backward with sampled labels; ``generator`` makes them reproducible,
    ``opt.last_labels`` holds them) or "exact" (one extra backward per output unit). ``backend`` goes
    to ``tengrad.compile`` ("auto" is "torch" on CPU). ``kl_clip``: K-FAC's KL clipping, the step's
    squared damped-Fisher length lr^2 nu^2 <d, g> is kept <= kl_clip (stepctl.py); None: the exact step.
    ``max_jacobian_numel``: the largest explicit per-layer Jacobian (rows x params) paths.py may keep.
    ``opt.explain()`` (also ``repr``) lists each block, its path choice and the fallback parameters.
    """

    def __init__(self, model: nn.Module, lr: float = stepctl.DEFAULT_LR,
                 damping: float = stepctl.DEFAULT_DAMPING, momentum: float = 0.9,
                 weight_decay: float = 0.0, update_freq: int = stepctl.DEFAULT_UPDATE_FREQ,
                 fisher: str = "empirical", backend: str = "auto",
                 kl_clip: float | None = stepctl.DEFAULT_KL_CLIP,
                 generator: torch.Generator | None = None, max_jacobian_numel: int = 2 ** 26,
                 grad_from_jacobian: bool = True) -> None:
        if lr <= 0 or damping <= 0:
            raise TENGraDError(f"lr and damping must be positive, got lr={lr}, damping={damping}")
        if fisher not in fisher_mod.FISHERS:
            raise TENGraDError(f"unknown fisher {fisher!r}; valid: {list(fisher_mod.FISHERS)}")
        if int(update_freq) < 1:
            raise TENGraDError(f"update_freq must be >= 1, got {update_freq}")
        if kl_clip is not None and kl_clip <= 0:
            raise TENGraDError(f"kl_clip must be positive or None, got {kl_clip}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise TENGraDError("the model has no trainable parameters")
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.model = model
        self.fisher = fisher
        self.update_freq = int(update_freq)
        self.kl_clip = kl_clip
        self.generator = generator
        self.max_jacobian_numel = int(max_jacobian_numel)
        self.grad_from_jacobian = bool(grad_from_jacobian) and fisher == "empirical"
        self.backend = resolve_backend(model, backend)
        self.blocks, self.fallback, self.fallback_why = find_blocks(model, self.backend)
        self._phase = GRADIENT
        self._steps = 0
        self._opt_backward = False
        self.last_nu = 1.0                       # the KL-clipping factor of the last step (stepctl.py)
        self.last_labels: Tensor | None = None   # labels drawn by the last opt.backward (fisher="mc")
        for b in self.blocks:
            b.capture = LayerCapture(b.name, b.module, self._curvature_due, lambda: self._phase,
                                     keep_edges=fisher != "empirical")
            b.capture.fuse_params = [(n, p) for n, p in b.plan.params if p.requires_grad]
            b.capture.on_fused_grad = partial(self._fused_grad, b)
        if self.fallback:
            names = ", ".join(n for n, _ in self.fallback)
            reasons = "; ".join(f"{k}: {v}" for k, v in self.fallback_why.items())
            warnings.warn(f"TENGraD: no layer plan for parameters [{names}] ({reasons or 'no plan'}); "
                          "they use the damped identity d = g / damping", stacklevel=2)

    # ------------------------------------------------------------------ when curvature is captured
    def _curvature_due(self) -> bool:
        return self._steps % self.update_freq == 0 or any(b.curv is None for b in self.blocks)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and forget the output gradients captured since the last step."""
        super().zero_grad(set_to_none=set_to_none)
        for b in self.blocks:
            b.capture.clear()

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
            inputs = [e for b in self.blocks for e in b.capture.edges()]
            inputs = inputs or [p for b in self.blocks for p in b.params]
            self._phase = CURVATURE
            try:
                for v in vs:
                    torch.autograd.grad(out, inputs, grad_outputs=v, retain_graph=True, allow_unused=True)
            finally:
                self._phase = GRADIENT
                for b in self.blocks:
                    b.capture.clear_edges()
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
        return g + wd * p.detach().to(dtype) if wd else g

    def _curvature(self, b: Block, damping: float) -> woodbury.BlockCurvature:
        rec = b.capture.take()
        if rec is None or (rec.grad is None and not rec.rows):
            raise TENGraDError(
                f"layer {b.name!r} ({type(b.module).__name__}) has gradients but no captured output "
                "gradient: run the forward in training mode with grad enabled before the backward")
        dtype = woodbury.compute_dtype(b.params[0].dtype)
        x = rec.x.to(dtype) if rec.x.is_floating_point() else rec.x
        m = x.shape[0]
        if self.fisher == "empirical":
            if rec.grad is None:
                raise TENGraDError(f"layer {b.name!r}: no ordinary backward reached it")
            gy = m * rec.grad.to(dtype)
        else:
            if not rec.rows:
                raise TENGraDError(f"layer {b.name!r}: fisher={self.fisher!r} has no curvature rows; "
                                   "use out = model(x); loss = opt.backward(out, y, loss=...)")
            gy = torch.cat([r.to(dtype) for r in rec.rows], dim=0)       # [C*m, ...], row c*m + i
            reps = gy.shape[0] // m
            if reps > 1:
                x = x.unsqueeze(0).expand(reps, *x.shape).reshape(reps * m, *x.shape[1:])
        key = (tuple(x.shape), tuple(gy.shape))
        if key not in b.choices:          # pricing runs the cost model: once per block and sizes
            b.choices[key] = paths.choose(b.plan, key[0], key[1], b.numel, self.update_freq,
                                          self.max_jacobian_numel)
        b.choice = b.choices[key]
        if self.update_freq > 1 and b.choice.path == paths.REUSE and x is rec.x:
            x = x.clone()   # kept for k steps: must not alias a batch buffer the caller may refill
        fused = b.choice.path == paths.JACOBIAN and self.grad_from_jacobian
        # next curvature step: detach this layer's parameters for inputs of this shape (capture.py)
        b.capture.fuse_shape = tuple(rec.x.shape) if fused else None
        jac = None
        if fused and rec.jac is not None:
            jac = woodbury.flatten_jacobian(rec.jac, scale=float(m))    # the record holds J / m
        return woodbury.build(b.plan, x, gy, m, damping, b.choice.path, b.name, jac=jac)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.fisher != "empirical" and not self._opt_backward:
            raise TENGraDError(f"fisher={self.fisher!r} needs its own backward passes: use "
                               "out = model(x); opt.zero_grad(); loss = opt.backward(out, y, loss=...); "
                               "opt.step() instead of loss.backward()")
        group = self.param_groups[0]
        lr, a, mom, wd = group["lr"], group["damping"], group["momentum"], group["weight_decay"]
        due = self._steps % self.update_freq == 0
        new_curv: dict[int, woodbury.BlockCurvature] = {}
        directions: list[tuple[Tensor, Tensor, Tensor, str]] = []      # (param, d, g, 'layer ...')
        device_type = self.param_groups[0]["params"][0].device.type
        try:
            with torch.autocast(device_type=device_type, enabled=False):
                for i, b in enumerate(self.blocks):
                    if all(p.grad is None for p in b.params):
                        b.capture.clear()
                        continue
                    dtype = woodbury.compute_dtype(b.params[0].dtype)
                    g = [self._gradient(p, wd, dtype) for p in b.params]
                    if due or b.curv is None:
                        curv = self._curvature(b, a)
                    else:
                        b.capture.clear()
                        curv = b.curv if b.curv.requested == a else woodbury.redamp(b.curv, a, b.name)
                    new_curv[i] = curv
                    d = woodbury.direction(curv, b.plan, g, b.name)
                    directions += [(p, di, gi, f"layer {b.name!r}") for p, di, gi in zip(b.params, d, g)
                                   if p.grad is not None]
                for name, p in self.fallback:
                    if p.grad is None:
                        continue
                    g = self._gradient(p, wd, woodbury.compute_dtype(p.dtype))
                    directions.append((p, g / a, g, f"parameter {name!r}"))
                stepctl.check_finite(directions)
        finally:
            self._opt_backward = False
        nu = stepctl.kl_scale(directions, lr, self.kl_clip)
        self.last_nu = nu
        # commit: nothing above wrote to parameters, buffers or stored curvature
        for i, curv in new_curv.items():
            self.blocks[i].curv = curv
        stepctl.apply(self, directions, lr, mom, nu)
        self._steps += 1
        return loss

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        sd = super().state_dict()
        blocks = {}
        for b in self.blocks:
            if b.curv is None:
                continue
            c = b.curv
            blocks[b.name] = dict(c.tensors(), path=c.path, m=c.m, damping=c.damping,
                                  requested=c.requested,
                                  choice=None if b.choice is None else (b.choice.path, b.choice.note))
        sd["tengrad"] = {"steps": self._steps, "blocks": blocks,
                         "generator": None if self.generator is None else self.generator.get_state()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("tengrad", None)
        super().load_state_dict(state_dict)
        if extra is None:
            return
        self._steps = int(extra["steps"])
        by_name = {b.name: b for b in self.blocks}
        for name, c in extra["blocks"].items():
            if name not in by_name:
                raise TENGraDError(f"state_dict has curvature for layer {name!r}, which this model lacks")
            b = by_name[name]
            dev = b.params[0].device
            t = {k: None if c[k] is None else c[k].to(dev).clone()
                 for k in ("x", "gy", "jac", "gram", "chol")}
            b.curv = woodbury.BlockCurvature(c["path"], t["x"], t["gy"], t["jac"], t["gram"], t["chol"],
                                             int(c["m"]), float(c["damping"]), float(c["requested"]))
            if c.get("choice") is not None:
                b.choice = paths.PathChoice(*c["choice"])
        if extra.get("generator") is not None and self.generator is not None:
            self.generator.set_state(extra["generator"])

    def remove_hooks(self) -> None:
        """Detach this optimizer's forward hooks from the model (it can no longer capture curvature)."""
        for b in self.blocks:
            b.capture.remove()

    # ------------------------------------------------------------------ printing
    def explain(self) -> str:
        g = self.param_groups[0]
        lines = [f"TENGraD(lr={g['lr']}, damping={g['damping']}, momentum={g['momentum']}, "
                 f"weight_decay={g['weight_decay']} (coupled), fisher={self.fisher!r}, "
                 f"update_freq={self.update_freq}, kl_clip={self.kl_clip}, backend={self.backend!r})"]
        for b in self.blocks:
            kind = type(b.module).__name__
            if b.choice is None:
                how = "path undecided (no curvature step yet)"
            else:
                how = f"path={b.choice.path}: {b.choice.note}"
            rows = "" if b.curv is None else f", curvature from m={b.curv.m} (rows={b.curv.gram.shape[0]})"
            lines.append(f"  block {b.name} ({kind}, {b.numel} params{rows}) {how}")
        if self.fallback:
            lines.append("  fallback d = g / damping: " + ", ".join(n for n, _ in self.fallback))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.explain()
