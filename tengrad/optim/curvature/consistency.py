"""Checks that a block's captured curvature describes the gradient autograd computed.

For a block with per-sample output gradients gy_i = m * grad_i (capture/module.py) the rows J_i of
its Jacobian sum to the mean gradient: g = (1/m) J^T 1. A spec that contradicts the module's forward
(a transposed weight that still binds the shapes), or a parameter that is also used outside the
module's forward (a tied weight: ``F.linear(h, emb.weight)``), breaks that identity silently: the
curvature is built from J, the step from ``param.grad``. So, on the first curvature step of each
block (every curvature step with ``TENGraD(..., check=True)``; never with ``check=None``):

    e = || s (J^T 1 / m) - param.grad || / max(||J^T 1 / m||, ||param.grad||),
    s = <J^T 1 / m, param.grad> / ||J^T 1 / m||^2          (over the block's parameters together)

must not exceed a tolerance for the dtypes (1e-6 float64, 1e-3 float32, 0.1 when the parameters or
the captured output gradient are bf16/fp16, e.g. under autocast: the forward and backward round) and s must be positive. The best positive factor s
lets gradient clipping or loss scaling between backward and step (a common factor per block)
through; a spec or use that disagrees with the forward gives a different direction.

The sum hides how the rows are split, so the check also compares the leading dimension of every
block's captured input (its rows) with the batch of the forward: the leading dimension of the
model's input in the last training forward whose output received a gradient. A Linear on a
sequence-first ``[T, N, d]`` tensor (rows = T) or on tokens flattened to ``[N*T, d]`` fails it.

With several ranks (an initialised process group) ``param.grad`` is the all-reduced mean while the
capture is local, so only the batch-dimension check runs there.

Every curvature step (unless ``check=None``; single process) also screens for a loss term the rows do
not explain, a gradient penalty, at no extra product with R (``screen``, ``unexplained``): each fresh
block without weight decay compares R g with s K 1 / m (both formed by the step anyway), the smallest
fresh block's J^T 1 / m (formed for the loss scale, curvature/build.py) is compared with param.grad, and
a ``create_graph`` pass reaching a call whose weights were detached for the gradient from the Jacobian
is refused (``graph_pass_error``). Measured cost of the alternative, ``verify`` on every curvature step:
docs/experiments/step-cost.md.

Cost: one ``plan.vjp`` per block (and one binding of its input and output gradient) on the first
curvature step; with ``check=True`` one per block on every curvature step. A failure raises before
anything is written, so parameters, momentum buffers and stored curvature stay untouched.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from tengrad.optim.capture.hooks import OwnHook, transformed
from tengrad.optim.errors import TENGraDError

TOL = {torch.float64: 1e-6, torch.float32: 1e-3}
LOW_PRECISION_TOL = 0.1
CANCELLED_ULPS = 1024    # a sum of n terms rounds by ~sqrt(n) eps of their absolute sum; n up to ~1e6

CAUSES = ("likely causes: (1) a parameter of this module is also used outside its forward, e.g. a "
          "tied output head logits = F.linear(h, emb.weight); (2) the batch is not dimension 0 of "
          "the layer's input and output, e.g. a Linear on a sequence-first [T, N, d] tensor; (3) a "
          "spec registered with tengrad.register_layer that binds the shapes but contradicts the "
          "module's forward (e.g. a transposed weight). Gradients changed per element between "
          "backward and step (clip_grad_value_) also fail this check: pass TENGraD(..., check=None).")


class ConsistencyError(TENGraDError):
    """A block's curvature contradicts its gradient (spec, batch dimension or a use outside forward)."""


class SpecMismatchError(ConsistencyError):
    """J^T 1 / m of a block differs from its param.grad."""


class BatchDimensionError(ConsistencyError):
    """A block's captured input has a leading dimension other than the batch of the forward."""


class UnexplainedGradientError(ConsistencyError):
    """On a curvature step ``param.grad`` has a part the per-sample rows do not explain: a loss term
    that is not a mean of per-sample losses through the layers' outputs (a gradient penalty)."""


class MissingCaptureError(ConsistencyError):
    """A block's parameters received gradients, but no output of its forward did."""


def _describe(b) -> str:
    terms = getattr(b.plan, "terms", ())
    specs = "; ".join(f"{t.param}: {t.spec.describe()}" for t in terms)
    return f"layer {b.name!r} ({type(b.module).__name__}, spec {specs or 'unknown'})"


class ConsistencyCheck:
    """Watches the model's forwards for the batch size and checks blocks (see module docstring).

    ``mode``: False (default) checks each block on its first curvature step, True on every curvature
    step, None never.
    """

    def __init__(self, model: nn.Module, mode: bool | None = False, batch_dim: int = 0, hooks=None) -> None:
        if mode not in (True, False, None):
            raise TENGraDError(f"check must be True, False or None, got {mode!r}")
        self.mode = mode
        self.batch_dim = batch_dim
        self.checked: set[str] = set()
        self.batch: int | None = None            # leading dim of the input of the differentiated forward
        self.last_forward_training: bool | None = None
        self.names: set[str] | None = None       # the blocks (set by the optimizer): None, not known
        self._handle = model.register_forward_hook(OwnHook(self._forward))
        if hooks is not None:       # the optimizer's capture hooks (a capture/hooks.py HookSet): off on reuse steps
            hooks.add(self._handle)

    def _forward(self, module: nn.Module, args: tuple, output: object) -> None:
        if not torch.is_grad_enabled() or (isinstance(output, Tensor) and transformed(output)):
            return
        self.last_forward_training = module.training
        if not (isinstance(output, Tensor) and output.requires_grad and args and isinstance(args[0], Tensor)
                and args[0].dim() > self.batch_dim):
            return
        if self.mode is None or (self.mode is False and self.names is not None and self.names <= self.checked):
            return   # no check will read the batch: no tensor hook per forward (reuse steps cost ~nothing)
        batch = int(args[0].shape[self.batch_dim])

        def seen(grad: Tensor) -> None:
            self.batch = batch

        output.register_hook(seen)

    def remove(self) -> None:
        self._handle.remove()

    # ------------------------------------------------------------------ the checks
    def mark_checked(self, name: str) -> None:
        self.checked.add(name)

    def forget(self, name: str) -> None:
        """Check ``name`` again (its parameters changed)."""
        self.checked.discard(name)

    def due(self, name: str) -> bool:
        return self.mode is True or (self.mode is False and name not in self.checked)

    def verify(self, b, x: Tensor, grad: Tensor | None, batch: int | None = None, graph_pass: bool = False) -> None:
        """Raise a ConsistencyError naming the block if its capture contradicts its gradient.

        ``x``: the captured input [m, ...] (compute dtype, or ids); ``grad``: the captured dL/dy;
        ``batch``: the batch the rows must have (the union of accumulated micro-batches), else the
        model's input's in the last training forward; ``graph_pass``: a ``create_graph`` pass reached the
        layer's output this step (a gradient penalty: the mismatch is then named as one)."""
        if grad is None or not self.due(b.name):
            return
        m = int(x.shape[0])
        batch = batch if batch is not None else self.batch
        if batch is not None and m != batch:
            raise BatchDimensionError(
                f"{_describe(b)}: its input has leading dimension {m} but the model's input has batch "
                f"{batch}. TENGraD takes dimension 0 of every layer input and output as the sample "
                "dimension, so this block's curvature would be built from rows that are not samples "
                "(e.g. a Linear on a sequence-first [T, N, d] tensor, or on tokens flattened to [N*T, d]). "
                "Keep the batch first at this layer (batch_first=True, or transpose before it).")
        grads = [p.grad for p in b.params]
        if all(g is None for g in grads) or multi_rank():
            return    # several ranks: param.grad is the all-reduced mean, the capture is local
        dtype = torch.promote_types(b.params[0].dtype, torch.float32)
        # J^T 1 / m = vjp(x, m grad, 1 / m) = vjp(x, grad, 1): no scaled copy of grad, and the
        # comparison streams (``streamed_dots``), so the check's extra memory is the vjp's output
        got = b.plan.vjp(x, grad.to(dtype), torch.ones(m, dtype=dtype, device=grad.device))
        dots = streamed_dots([(t, g) for t, g in zip(got, grads) if g is not None])
        del got
        if dots is None:
            return    # non-finite values: the step's own checks name them
        err, scale = from_dots(*dots)
        tol = tolerance(b.params[0].dtype, grad.dtype)
        if not (err <= tol and scale > 0) and cancelled(math.sqrt(dots[0]), _reach(b, x, grad, dtype), dtype):
            return    # J^T 1 / m is the roundoff of a sum that cancels: no direction to compare (not checked)
        if not (err <= tol and scale > 0) and graph_pass:
            raise UnexplainedGradientError(
                f"{_describe(b)}: param.grad != s J^T 1 / m for its per-sample rows J (relative error {err:.3g} "
                f"after the best factor {scale:.3g}; tolerance {tol:g}), and a torch.autograd.grad(..., "
                "create_graph=True) pass reached its output on this step: the gradient has a part its per-sample "
                "rows do not explain. " + PENALTY_HINT)
        if not (err <= tol and scale > 0):
            raise SpecMismatchError(
                f"{_describe(b)}: J^T 1 / m from the captured input and output gradient does not match "
                f"param.grad (relative error {err:.3g} after the best factor {scale:.3g}; tolerance {tol:g}), "
                f"so its curvature would describe a different function than the one trained. {CAUSES}")
        self.checked.add(b.name)

    def missing_capture(self, b) -> ConsistencyError:
        """The error for a block whose parameters have a non-zero gradient but whose forward output
        received none."""
        head = (f"layer {b.name!r} ({type(b.module).__name__}) has a non-zero gradient but no captured "
                "output gradient")
        if self.last_forward_training is False:
            return MissingCaptureError(
                f"{head}: the model ran its last forward with grad in eval mode; call model.train() "
                "before the training forward (TENGraD captures forwards of a model in training mode)")
        return MissingCaptureError(
            f"{head}: no module forward of it and no op with a spec (F.linear, F.conv*, norms, "
            "F.embedding, registered ops) that reads its parameters received an output gradient; a "
            "parameter of this module is used only by ops without a spec (register one with "
            "tengrad.register_op), or the forward ran under no_grad or inside a torch.func transform, "
            "or the hooks were removed.")


PENALTY_HINT = ("TENGraD's Fisher is built from the per-sample gradients of a mean loss L = (1/m) sum_i l_i "
                "through the layers' outputs; a term they do not explain, such as a gradient penalty "
                "(R1, a gradient norm: torch.autograd.grad(..., create_graph=True) added to the loss) or an "
                "L2 term on the parameters written into the loss (pass weight_decay= instead), would give "
                "a step with another function's curvature. Curvature steps with such a term are refused "
                "with nothing changed; on reuse steps (update_freq > 1) the kept curvature preconditions "
                "the whole gradient, penalty included. Move the penalty to a step where curvature is not "
                "due, or pass TENGraD(..., check=None) to accept the step (README 'Losses and conventions').")


def graph_pass_error(b) -> UnexplainedGradientError:
    """A ``create_graph`` pass (not accumulating into .grad) reached the output of a call whose
    parameters were detached for the gradient from the Jacobian: the penalty built from it would
    lose its terms through those parameters, so the step is refused."""
    return UnexplainedGradientError(
        f"{_describe(b)}: a torch.autograd.grad(..., create_graph=True) pass reached its output on this "
        "curvature step, and its weight gradient comes from its Jacobian (grad_from_jacobian=True, the "
        "default): a gradient penalty built from that pass would lose its terms through this layer's "
        "weights. Pass TENGraD(..., grad_from_jacobian=False) to keep them in the graph. " + PENALTY_HINT)


def screen(b, gram: Tensor, rg: Tensor, m: int, tol: float) -> None:
    """The per-step check that costs no product with R: on a curvature step with empirical rows and
    g = param.grad (no weight decay folded in), g = s R^T 1 / m (s > 0: clipping, an undetected loss
    scale) implies

        R g = s R R^T 1 / m = s K 1 / m        ([m]; K and R g are both formed by the step anyway)

    so a mismatch beyond ``tol`` after the best s (``mismatch``) means param.grad has a part the rows do
    not explain (a gradient penalty; UnexplainedGradientError). Blind to a part orthogonal to the rows
    (R r = 0); the full check (``verify``, one J^T u per block) is not."""
    k1 = gram.sum(1, dtype=torch.float64)
    ka = gram.abs().sum(1, dtype=torch.float64)
    got = rg.reshape(-1).to(torch.float64)
    # one read-back: |K 1|^2, |R g|^2, <K 1, R g>, ||K| 1|^2; err = the sine of their angle (as ``mismatch``)
    kk, gg, kg, aa = torch.stack([k1 @ k1, got @ got, k1 @ got, ka @ ka]).tolist()
    if not all(math.isfinite(v) for v in (kk, gg, kg)):
        return    # non-finite values: the step's own checks name them
    if cancelled(math.sqrt(kk), math.sqrt(aa), gram.dtype):
        return    # K 1 = R (R^T 1) at roundoff: the rows' gradient cancels (``cancelled``), nothing to compare
    if kk == 0.0 or gg == 0.0:
        err, scale = (0.0, 1.0) if kk == gg else (1.0, 0.0)
    else:
        err, scale = math.sqrt(max(0.0, 1.0 - kg * kg / (kk * gg))), kg / kk * m
    if not (err <= tol and scale > 0):
        raise UnexplainedGradientError(
            f"{_describe(b)}: on this curvature step R g != s K 1 / m for its rows R, K = R R^T and "
            f"g = param.grad (relative error {err:.3g} after the best factor {scale:.3g}; tolerance {tol:g}): "
            "the gradient has a part its per-sample rows do not explain. " + PENALTY_HINT)


def unexplained(b, err: float, scale: float, tol: float) -> None:
    """Raise UnexplainedGradientError unless w (param.grad) = s a (a = J^T 1 / m), s > 0, to ``tol``
    after the best s: ``err``, ``scale`` are their ``mismatch`` (``from_dots``)."""
    if not (err <= tol and scale > 0):
        raise UnexplainedGradientError(
            f"{_describe(b)}: on this curvature step param.grad != s J^T 1 / m for its per-sample rows J "
            f"(relative error {err:.3g} after the best factor {scale:.3g}; tolerance {tol:g}): the gradient "
            "has a part its per-sample rows do not explain. " + PENALTY_HINT)


def cancelled(norm: float, reach: float, dtype: torch.dtype) -> bool:
    """Whether a gradient J^T 1 / m of norm ``norm`` is at the roundoff level of the sum that forms it, ``reach``
    the norm of the sum of its terms' magnitudes (|J|^T 1 / m: ``Rows.magnitudes``; both in the rows' own
    scale, which a loss scale multiplies and param.grad does not): a gradient that vanishes
    by the model's structure (the bias of a layer a BatchNorm follows: in training mode BatchNorm cancels
    any per-channel shift, so d loss / d bias = 0 exactly) is left as the rounding of sum_i J_i^T 1 / m, and
    two such noise vectors point anywhere (the check failed with relative error 0.58 on a conv bias before
    BatchNorm, its weight frozen): no direction to compare, no loss scale to read."""
    return norm <= CANCELLED_ULPS * torch.finfo(dtype).eps * reach


def _reach(b, x: Tensor, grad: Tensor, dtype: torch.dtype) -> float:
    """|| |J|^T 1 || from |x_hat| and |gy| (``cancelled``'s reach, plan.vjp_magnitudes; the vjp's 1 / m
    cancels gy = m grad)."""
    bound = b.plan.vjp_magnitudes(x, grad.to(dtype), torch.ones(x.shape[0], dtype=dtype, device=grad.device))
    return math.sqrt(sum(float(t.double().square().sum()) for t in bound))


def tolerance(param_dtype: torch.dtype, grad_dtype: torch.dtype) -> float:
    """The check's tolerance for the parameters' and the captured output gradients' dtypes."""
    return max(TOL.get(param_dtype, LOW_PRECISION_TOL), TOL.get(grad_dtype, LOW_PRECISION_TOL))


def multi_rank() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _dense(g: Tensor) -> Tensor:
    return g.to_dense() if g.is_sparse else g


#: elements per float64 chunk of ``streamed_dots`` (8 MiB per chunk and operand)
CHUNK = 2 ** 20


def streamed_dots(pairs) -> tuple[float, float, float] | None:
    """(aa, ww, aw) = (sum a_j^2, sum w_j^2, sum a_j w_j) over a = the concatenated first tensors and
    w = the second ones of ``pairs`` [(a_t, w_t)] (same numel each; w_t may be sparse), in float64,
    CHUNK elements at a time: no float64 copies of a and w (for a 4096 x 4096 Linear those were
    0.5 GB). None when a sum is not finite (a non-finite entry: the step's own checks name it)."""
    total = None
    for a, w in pairs:
        a, w = a.reshape(-1), _dense(w).reshape(-1)
        for i in range(0, a.numel(), CHUNK):
            ac, wc = a[i:i + CHUNK].to(torch.float64), w[i:i + CHUNK].to(torch.float64)
            part = torch.stack([ac @ ac, wc @ wc, ac @ wc])
            total = part if total is None else total + part
    if total is None:
        return 0.0, 0.0, 0.0
    aa, ww, aw = total.tolist()             # one read-back
    return (aa, ww, aw) if all(math.isfinite(v) for v in (aa, ww, aw)) else None


def from_dots(aa: float, ww: float, aw: float) -> tuple[float, float]:
    """``mismatch`` from the dots: scale = aw / aa, err = |scale a - w| / |w| = sqrt(max(0, ww - aw^2 / aa) / ww)
    (the sine of the angle between a and w)."""
    if max(aa, ww) == 0.0:
        return 0.0, 1.0
    if aa == 0.0 or ww == 0.0:
        return 1.0, 0.0
    return math.sqrt(max(0.0, ww - aw * aw / aa) / ww), aw / aa


def mismatch(a: Tensor, w: Tensor) -> tuple[float, float]:
    """(relative error after the best positive factor, that factor) between a and w."""
    na, nw = float(a.norm()), float(w.norm())
    if max(na, nw) == 0.0:
        return 0.0, 1.0
    if na == 0.0 or nw == 0.0:
        return 1.0, 0.0
    scale = float(a @ w) / (na * na)
    return float((scale * a - w).norm()) / nw, scale      # the sine of the angle between a and w


__all__: Sequence[str] = ("ConsistencyCheck", "ConsistencyError", "SpecMismatchError",
                          "BatchDimensionError", "MissingCaptureError",
                          "UnexplainedGradientError")
