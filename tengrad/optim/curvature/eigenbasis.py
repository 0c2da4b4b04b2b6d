"""A prior in Shampoo's eigenbasis (``TENGraD(..., prior="soap")``; issue 24, item 3).

SOAP (Vyas et al. 2024) runs Adam in the eigenbasis of Shampoo's Kronecker factors. As a prior outside
the rows it is D = Q diag(delta) Q^T per weight, Q = Q_out (x) Q_in orthogonal, delta > 0 Adam's
second moments of the rotated gradient; any such D is symmetric positive definite, so the Woodbury step
(R^T R / m + a D)^-1 g stays exact. With T = diag(s) Q^T, s = delta^-1/2, T D T^T = I and

    (R^T R / m + a D)^-1 g = T^T (R''^T R'' / m + a I)^-1 T g,     R'' = R T^T,

so a block keeps the rows R'' (each row's weight part rotated and scaled: s * (Q_out^T X Q_in)), its
Gram K'' = R'' R''^T, and the step maps g'' = T g into the solve and d = T^T d'' out of it
(``Rotated``); <d, g> = <d'', g''>. Parameters that are not rotated (1-D, a side over ``MAX_DIM``, a
weight whose eigenbasis would cost more than ROTATE_SHARE of its layer's forward and backward at the
first curvature step's batch: ``worth_rotating``, decided once per weight and kept in its state; a
parameter in no block) keep the diagonal of curvature/prior.py (an elementwise s, or Adafactor's
Kronecker form on x and gy), so one block may mix both.

The state of a rotated weight W [o, ...] viewed as G [o, n] (its gradient), per step after the update
(``EigenMoments``; optimizer state "prior_l", "prior_r", "prior_ql", "prior_qr", "prior_v"):

    L = b L + (1 - b) G G^T  [o, o],   R = b R + (1 - b) G^T G  [n, n]      (b = ``SHAMPOO_BETA``)
    v = beta v + (1 - beta) (Q_out^T G Q_in)^2  [o, n]

from L_0 = R_0 = 0 (as SOAP: the bias correction is a scalar, which leaves the bases as they are) and
v_1 = (Q_out^T G_1 Q_in)^2 in the bases of the first gradient alone (the convention of "adam"'s v,
curvature/prior.py). Every ``EVERY`` steps the bases are refreshed, Q_out, Q_in = eigenvectors of L, R (eigh), and v is
carried into the new basis as the second moments of independent entries would be:
v <- P_out^2 v (P_in^2)^T with P = Q_new^T Q_old (squared entrywise; a permutation of the basis
permutes v, as SOAP re-indexes its second moments). delta = max(sqrt(v) / mean_block sqrt(v), floor),
taken at a curvature step and kept with the rows (reuse steps are exact for the kept D). At step 0
(no statistics yet) a block with a rotatable weight keeps the identity prior: the bases of one gradient
G = U S V^T make Q^T G Q diagonal, so every other entry's delta is the floor and the rows' correction is
amplified 1 / floor there (measured on the LM task: training loss 8.8 over steps 15-29 against 3.2).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

SHAMPOO_BETA = 0.95         # SOAP's default for the Kronecker factors
EVERY = 10                  # SOAP's default precondition_frequency
MAX_DIM = 2048              # a weight side above this keeps the diagonal prior (eigh of a larger factor)


#: a weight is rotated when its eigenbasis costs at most this share of its layer's forward and backward
ROTATE_SHARE = 0.3
#: ... or when o n (o + n) is at most this (a small weight: its rotations cost little in absolute terms)
ROTATE_FLOOR = 2 ** 23
ROTATE = "prior_rotate"     # optimizer state: the sticky decision per weight (``decide``)


def sides(p: Tensor) -> tuple[int, int]:
    """(o, n) of a weight's [o, n] view (dim 0 against the rest)."""
    return p.shape[0], p.numel() // max(p.shape[0], 1)


def rotatable(p: Tensor) -> bool:
    """A weight of 2 or more dims whose [o, n] view has both sides <= MAX_DIM."""
    return p.dim() >= 2 and max(sides(p)) <= MAX_DIM


def worth_rotating(p: Tensor, out_numel_per_sample: int | None, samples: int) -> bool:
    """Whether weight ``p`` [o, n] takes SOAP's eigenbasis: ``rotatable`` and its per-step cost, the factor
    updates G G^T and G^T G and three rotations (the gradient for v, the step's input into the basis and
    its d out of it), ~8 o n (o + n) flops, at most ROTATE_SHARE of its layer's forward and backward,
    ~6 (its output elements per step) n flops (a Linear's 6 T o n for T rows of the batch, a conv's
    6 m H W o c k^2); or o n (o + n) <= ROTATE_FLOOR. A layer whose outputs are unknown here (a J summed
    over uses) rotates. Otherwise the weight keeps Adam's diagonal (Adafactor's Kronecker form on x and
    gy for a Linear or a conv: prior.py): with few rows per step, as a ViT-tiny at batch 32 (544 rows
    against sides of 576 and 768), the eigenbasis cost 2-3x the layer's own step."""
    if not rotatable(p):
        return False
    o, n = sides(p)
    if o * n * (o + n) <= ROTATE_FLOOR or out_numel_per_sample is None:
        return True
    return 8.0 * o * n * (o + n) <= ROTATE_SHARE * 6.0 * out_numel_per_sample * samples * n


def decide(state: dict, params: Sequence[Tensor], out_numel_per_sample: int | None, samples: int) -> None:
    """Record ``worth_rotating`` per rotatable weight of a block in its state (``ROTATE``), once: the
    decision is sticky (a weight's factors and bases are kept from then on); parameters no block decides
    for (the fallback's) are never rotated."""
    for p in params:
        st = state[p]
        if ROTATE not in st and rotatable(p):
            st[ROTATE] = worth_rotating(p, out_numel_per_sample, samples)


def rotates(state: dict, p: Tensor, undecided: bool = False) -> bool:
    """Whether ``p`` is kept in the eigenbasis: its recorded decision (a state from before decisions were
    recorded: whether it holds a basis; none of either: ``undecided``)."""
    st = state.get(p, {})
    return bool(st.get(ROTATE, "prior_ql" in st or undecided)) and rotatable(p)


class Rotated:
    """T = diag(s) Q^T of one weight (module docstring): ``q_out`` [o, o], ``q_in`` [n, n], ``s`` [o, n]."""

    __slots__ = ("q_out", "q_in", "s")

    def __init__(self, q_out: Tensor, q_in: Tensor, s: Tensor) -> None:
        self.q_out, self.q_in, self.s = q_out, q_in, s

    def rows(self, piece: Tensor) -> Tensor:
        """R'' = R T^T for a piece [r, P] of J (P = o n): each row rotated and scaled."""
        r, (o, n) = piece.shape[0], self.s.shape
        x = piece.reshape(r, o, n)
        out = torch.matmul(torch.matmul(self.q_out.t().to(x.dtype), x), self.q_in.to(x.dtype))
        return out.mul_(self.s.to(x.dtype)).reshape(r, o * n)

    def into(self, g: Tensor) -> Tensor:
        """g'' = T g, shaped like g."""
        o, n = self.s.shape
        q_out, q_in = self.q_out.to(g.dtype), self.q_in.to(g.dtype)
        return (q_out.t() @ g.reshape(o, n) @ q_in).mul_(self.s.to(g.dtype)).reshape(g.shape)

    def out_of_(self, d: Tensor) -> Tensor:
        """d = T^T d'', written into ``d`` (shaped like the weight)."""
        o, n = self.s.shape
        q_out, q_in = self.q_out.to(d.dtype), self.q_in.to(d.dtype)
        return d.copy_((q_out @ (d.reshape(o, n) * self.s.to(d.dtype)) @ q_in.t()).reshape(d.shape))

    def state(self) -> dict:
        return dict(q_out=self.q_out, q_in=self.q_in, s=self.s)


def into(prior: Sequence, g: Sequence[Tensor]) -> list[Tensor]:
    """g' = S g per parameter: an elementwise s (diagonal prior) or a ``Rotated``."""
    return [si.into(gi) if isinstance(si, Rotated) else gi * si.to(gi.dtype) for gi, si in zip(g, prior)]


def out_of_(prior: Sequence, d: Sequence[Tensor]) -> None:
    """d = S^T d' in place, per parameter (the diagonal ones in one foreach product)."""
    diag = [(di, si.to(di.dtype)) for di, si in zip(d, prior) if not isinstance(si, Rotated)]
    if diag:
        torch._foreach_mul_([a for a, _ in diag], [b for _, b in diag])
    for di, si in zip(d, prior):
        if isinstance(si, Rotated):
            si.out_of_(di)


def rows_of(prior: Sequence, pieces: Sequence[Tensor]) -> list[Tensor]:
    """R' = R S^T per parameter piece [r, P_i]."""
    return [si.rows(p) if isinstance(si, Rotated) else p * si.reshape(1, -1).to(p.dtype)
            for p, si in zip(pieces, prior)]


def _eigenvectors(f: Tensor) -> Tensor:
    """Orthonormal eigenvectors of a symmetric PSD factor (ascending eigenvalues); float64 if float32 fails."""
    try:
        return torch.linalg.eigh(f)[1]
    except RuntimeError:            # ill-conditioned: LAPACK did not converge in the factor's precision
        return torch.linalg.eigh(f.double())[1].to(f.dtype)


def basis(state: dict, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(Q_out, Q_in, v [o, n]) kept for a rotatable weight (after its first update)."""
    st = state[p]
    return st["prior_ql"], st["prior_qr"], st["prior_v"].reshape(p.shape[0], -1)


def _matrix(p: Tensor, dtype: torch.dtype) -> Tensor:
    g = p.grad.detach()
    g = g.to_dense() if g.is_sparse else g
    return g.to(dtype).reshape(p.shape[0], -1)


class EigenMoments:
    """The per-step state of ``prior="soap"`` (module docstring): the factors, bases and rotated second
    moments of rotatable weights, Adam's v of the others (curvature/prior.py's SecondMoments)."""

    def __init__(self, beta: float, diagonal) -> None:
        self.beta = float(beta)
        self.diagonal = diagonal    # prior.SecondMoments for the parameters that are not rotated

    def update(self, state: dict, params: Sequence[Tensor], dtype_of, step: int) -> None:
        """After step ``step`` (0-based): every parameter with a gradient, in the eigenbasis those a block
        decided to rotate (``decide``; the others Adam's diagonal v); bases refreshed when step + 1 is a
        multiple of EVERY."""
        flat = [p for p in params if p.grad is not None and not rotates(state, p)]
        self.diagonal.update(state, flat, dtype_of)
        refresh = (step + 1) % EVERY == 0
        b, beta = SHAMPOO_BETA, self.beta
        for p in params:
            if p.grad is None or not rotates(state, p):
                continue
            st = state[p]
            g = _matrix(p, dtype_of(p.dtype))
            if "prior_ql" not in st:
                st["prior_l"], st["prior_r"] = g @ g.t(), g.t() @ g
                q_out, q_in = _eigenvectors(st["prior_l"]), _eigenvectors(st["prior_r"])   # the first gradient's
                st["prior_ql"], st["prior_qr"] = q_out, q_in
                st["prior_v"] = (q_out.t() @ g @ q_in).square().reshape(p.shape)
                st["prior_l"].mul_(1.0 - b)
                st["prior_r"].mul_(1.0 - b)
                continue
            st["prior_l"].mul_(b).addmm_(g, g.t(), alpha=1.0 - b)
            st["prior_r"].mul_(b).addmm_(g.t(), g, alpha=1.0 - b)
            rot = st["prior_ql"].t() @ g @ st["prior_qr"]
            v = st["prior_v"].view(rot.shape)
            v.mul_(beta).addcmul_(rot, rot, value=1.0 - beta)
            if refresh:
                q_out, q_in = _eigenvectors(st["prior_l"]), _eigenvectors(st["prior_r"])
                p_out, p_in = (q_out.t() @ st["prior_ql"]).square(), (q_in.t() @ st["prior_qr"]).square()
                st["prior_v"] = (p_out @ v @ p_in.t()).reshape(p.shape)
                st["prior_ql"], st["prior_qr"] = q_out, q_in
