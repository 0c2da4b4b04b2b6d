"""Which rows J is built from: empirical, Monte-Carlo ("true") and exact (Gauss-Newton) Fisher.

Notation: the network output is ``out`` [m, ...] (m samples, batch first), the loss is mean-reduced,
L = (1/m) sum_i l_i, and J_i^out = d out_i / d theta. Every Fisher here has the form

    F = (1/m) sum_r  j_r j_r^T = R^T R / m,      j_r = (J_i^out)^T v_r   (row r belongs to sample i)

so every block direction is d = (1/a)(g - R^T (R R^T + m a I)^-1 R g) with the batch size m in the
damping term even when R has more than m rows. A row j_r is what a backward pass delivers when the
layer output receives the per-sample output gradient  gy_r = (J_i^y)^T v_r; the optimizer therefore only
chooses the output vectors v ("grad_outputs" of a backward pass through ``out``):

* empirical: v_i = dl_i/dout_i with the true labels; that is the ordinary backward (whose layer gradients
  are (1/m) gy, so the capture multiplies by m). R = J, F = J^T J / m.
* mc: v_i = dl(out_i, y~_i)/dout_i with y~_i drawn from the model's predictive distribution, one extra
  backward with ``grad_outputs = m * dL~/dout``. For cross_entropy y~ ~ Categorical(softmax(out)) (per
  position for [m, C, ...] logits). For mse, ``F.mse_loss`` (mean over all elements) is, per sample,
  l_i = (1/C)||out_i - y_i||^2 with C = out_i.numel(), the negative log-likelihood of N(out_i, (C/2) I)
  up to a constant, so y~_i = out_i + sqrt(C/2) eps. Then E[v v^T] = H_i and E[F_mc] = F_exact.
* exact: F = (1/m) sum_i (J_i^out)^T H_i J_i^out with H_i = d^2 l_i / d out_i^2, written through any
  factor H_i = S_i S_i^T as rows v_{ic} = S_i[:, c], one backward pass per column c (all samples at
  once, so R has m*C rows, ordered column-major: row c*m + i).
  - mse: H_i = (2/C) I, S_i = sqrt(2/C) I: pass c puts sqrt(2/C) on output element c of every sample.
  - cross_entropy on logits [m, C]: H_i = diag(p) - p p^T with p = softmax(out_i);
    S = diag(sqrt p) - p sqrt(p)^T satisfies S S^T = H (because sum_c p_c = 1), and its column c is
    v_c = sqrt(p_c) (e_c - p), i.e. sqrt(p_c) times the gradient of l for label c.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tengrad.optim.errors import TENGraDError

FISHERS = ("empirical", "mc", "exact")
LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
}


def _work(out: Tensor) -> Tensor:
    """``out`` detached, in float32 at least (bf16/fp16 outputs are sampled and differentiated in fp32)."""
    return out.detach().to(torch.promote_types(out.dtype, torch.float32))


def resolve_loss(loss: str | Callable[[Tensor, Tensor], Tensor]) -> tuple[str, Callable]:
    """(name, mean-reduced loss function); a callable is accepted for the empirical Fisher only."""
    if callable(loss):
        return getattr(loss, "__name__", "custom"), loss
    if loss not in LOSSES:
        raise TENGraDError(f"unknown loss {loss!r}; valid: {sorted(LOSSES)} or a callable (empirical only)")
    return loss, LOSSES[loss]


def sample_labels(out: Tensor, loss: str, generator: torch.Generator | None = None) -> Tensor:
    """Labels from the model's predictive distribution (see the module docstring)."""
    out = _work(out)
    draw_on = out.device if generator is None else generator.device   # a generator samples on its device
    if loss == "cross_entropy":
        probs = torch.softmax(out, dim=1).movedim(1, -1)           # [m, ..., C]
        flat = probs.reshape(-1, probs.shape[-1]).to(draw_on)
        idx = torch.multinomial(flat, 1, generator=generator).to(out.device)
        return idx.reshape(probs.shape[:-1])                        # [m, ...]
    if loss == "mse":
        c = out[0].numel()
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=draw_on)
        return out + math.sqrt(c / 2) * noise.to(out.device)
    raise TENGraDError(f"fisher='mc' needs loss 'cross_entropy' or 'mse', got {loss!r}")


def mc_grad_outputs(out: Tensor, loss_fn: Callable, labels: Tensor) -> list[Tensor]:
    """[v] with v = m * dL(out, labels)/dout: per-sample output gradients for the sampled labels."""
    od = _work(out).requires_grad_(True)
    with torch.enable_grad():
        (v,) = torch.autograd.grad(out.shape[0] * loss_fn(od, labels), od)
    return [v.to(out.dtype)]


#: the default cap on the exact Fisher's estimated memory (``TENGraD(max_exact_fisher_bytes=...)``)
DEFAULT_MAX_EXACT_BYTES = 2 ** 31


def exact_bytes(out: Tensor, n_blocks: int, compute_itemsize: int) -> int:
    """The memory the exact Fisher's curvature step allocates at least, in bytes, before any of it is:
    with m = out.shape[0] samples and C = out[0].numel() output units, the C output vectors (one per
    backward pass, each like ``out``), then per due block its Gram matrix K and its Cholesky factor,
    each (C m) x (C m) in the compute dtype:

        C * out.numel() * out.element_size()  +  n_blocks * 2 * (C m)^2 * compute_itemsize

    (the layers' output-gradient rows, C times each layer output, come on top)."""
    c, m = out[0].numel() if out.dim() else 1, out.shape[0] if out.dim() else 1
    return c * out.numel() * out.element_size() + n_blocks * 2 * (c * m) ** 2 * compute_itemsize


def check_exact_memory(out: Tensor, n_blocks: int, compute_itemsize: int, cap: int) -> None:
    """Refuse the exact Fisher's passes when ``exact_bytes`` exceeds ``cap``, with the number and the
    alternatives."""
    need = exact_bytes(out, n_blocks, compute_itemsize)
    if need > cap:
        c, m = out[0].numel(), out.shape[0]
        raise TENGraDError(
            f"fisher='exact' would allocate about {need / 2**30:.2f} GiB for C={c} output units and m={m} samples "
            f"({c} backward passes, and per block ({n_blocks} due) a Gram matrix and its factor of (C*m)^2 = "
            f"{(c * m) ** 2:.3g} entries), over max_exact_fisher_bytes={cap} ({cap / 2**30:.2f} GiB). Use "
            "fisher='mc' (one sampled backward, m rows per block: the same Fisher in expectation) or "
            "fisher='empirical', a smaller batch, or raise max_exact_fisher_bytes; nothing was changed")


def exact_grad_outputs(out: Tensor, loss: str) -> list[Tensor]:
    """The columns of S_i (H_i = S_i S_i^T) for every sample at once: one [m, ...] tensor per pass."""
    m = out.shape[0]
    if loss == "mse":
        c = out[0].numel()
        scale = math.sqrt(2.0 / c)
        vs = []
        for k in range(c):
            v = torch.zeros(m, c, dtype=out.dtype, device=out.device)
            v[:, k] = scale
            vs.append(v.reshape(out.shape))
        return vs
    if loss == "cross_entropy":
        if out.dim() != 2:
            raise TENGraDError("fisher='exact' with cross_entropy needs logits shaped [m, C], "
                               f"got {tuple(out.shape)}")
        p = torch.softmax(_work(out), dim=1)                       # [m, C]
        eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
        return [(p[:, c:c + 1].sqrt() * (eye[c] - p)).to(out.dtype) for c in range(p.shape[1])]
    raise TENGraDError(f"fisher='exact' needs loss 'cross_entropy' or 'mse', got {loss!r}")


def output_rows(label: str, fisher: str, grad: Tensor | None, rows: list[Tensor], m: int,
                dtype: torch.dtype) -> Tensor:
    """The per-sample output gradients gy [r, ...] of one captured call (r = m, or m*C for "exact").

    empirical: ``m * grad`` (autograd hands the layer dL/dy = (1/m) dl_i/dy_i); mc / exact: the rows of
    the curvature passes, concatenated (row c*m + i). ``label`` names the layer or use in errors.
    """
    if fisher == "empirical":
        if grad is None:
            raise TENGraDError(f"{label}: no ordinary backward reached it")
        return m * grad.to(dtype)
    if not rows:
        raise TENGraDError(f"{label}: fisher={fisher!r} has no curvature rows; "
                           "use out = model(x); loss = opt.backward(out, y, loss=...)")
    return torch.cat([r.to(dtype) for r in rows], dim=0)
