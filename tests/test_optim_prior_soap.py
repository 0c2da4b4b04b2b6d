"""``prior="soap"``: the step is the exact (F_b + a D_b)^-1 g_b for D in Shampoo's eigenbasis (issue 24,
item 3; tengrad/optim/curvature/eigenbasis.py).

Two oracles, float64, written out here from the docstring's definitions:

1. The step for the D the optimizer keeps. Per weight the kept prior is (Q_out, Q_in, s); D is built
   densely as (Q_out (x) Q_in) diag(1 / s^2) (Q_out (x) Q_in)^T on the row-major flattened weight
   (diag(1 / s^2) for a parameter kept diagonal), F_b from torch.func's per-sample gradients, and the
   update must be -lr (F_b + a D_b)^-1 g_b, on curvature and reuse steps, across a basis refresh.
2. D follows the definition: the oracle tracks L = b L + (1 - b) G G^T and R from the batch gradients
   itself (from 0), v = beta v + (1 - beta) (Q_out^T G Q_in)^2 (v_1 = (Q_out^T G_1 Q_in)^2, in bases that
   diagonalise G_1 G_1^T and G_1^T G_1) with the bases the optimizer holds at
   each step, carried at a refresh as P_out^2 v (P_in^2)^T (P = Q_new^T Q_old); the refreshed bases must
   diagonalise the oracle's L and R, and the kept s must be delta^-1/2 with delta = max(sqrt(v) /
   mean_block sqrt(v), floor) (Adam's v for the parameters kept diagonal). At step 0 a block with a
   rotatable weight keeps the identity prior (no statistics yet).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from support.numerics import rel_err
from support.optim_cases import LOSSES, TiedEncoderLM, ids_batch, lm_loss, make_model
from support.step_oracle import (dense_directions, fisher_from_grads, kept_prior_matrix, per_sample_grads,
                                 prior_batches)
from tengrad.optim import TENGraD
from tengrad.optim.curvature import eigenbasis

BETA, FLOOR, LR, DAMPING = 0.9, 0.05, 0.3, 0.5
SB = eigenbasis.SHAMPOO_BETA


def _opt(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TENGraD(model, LR, DAMPING, momentum=0.0, kl_clip=None, check=True, prior="soap",
                       prior_beta=BETA, prior_floor=FLOOR, **{"step_rule": "natural", **kw})


def _steps(kind: str, n: int, seed: int = 3):
    return prior_batches(kind, n, seed)


@pytest.mark.parametrize("kind,k", [("mlp", 1), ("mlp", 3), ("conv", 2), ("tokens", 1), ("tokens", 4)])
def test_soap_prior_step_is_the_exact_damped_step_for_the_kept_d(kind, k):
    model = make_model(kind)
    opt = _opt(model, update_freq=k)
    kept, rotated_seen = None, 0
    for s, (x, y) in enumerate(_steps(kind, 12)):       # 12 steps: across the refresh after step 10
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        rows = per_sample_grads(model, x, y, "cross_entropy")
        g = {n: t.mean(0) for n, t in rows.items()}
        opt.zero_grad()
        LOSSES["cross_entropy"](model(x), y).backward()
        opt.step()
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        priors = {b.name: b.curv.rows.prior for b in opt.blocks}
        if s % k == 0:
            kept = (fisher_from_grads(rows, names), priors)
        else:       # reuse steps keep the curvature step's D
            assert all(priors[n] is kept[1][n] for n in priors)
        F, kept_priors = kept
        dense = {}
        for b in opt.blocks:
            ops = kept_priors[b.name]
            if ops is None:     # the identity prior: only before the first statistics
                assert s < k and "no eigenbasis before the first step" in b.curv.rows.prior_note, (s, b.name)
                continue
            rotated_seen += sum(isinstance(o, eigenbasis.Rotated) for o in ops)
            dense.update({n: kept_prior_matrix(o) for o, n in zip(ops, b.param_names)})
        d = dense_directions(F, names, {n: g[n].shape for n in names}, g, [b.param_names for b in opt.blocks],
                             DAMPING, [n for n, _ in opt.fallback], prior=dense)
        for n in names:
            err = rel_err(model.get_parameter(n).detach() - theta[n], -LR * d[n])
            assert err < 1e-8, (s, n, err)
    assert rotated_seen > 0


@pytest.mark.parametrize("kind,k", [("tokens", 1), ("conv", 3)])
def test_soap_prior_tracks_shampoos_bases_and_rotated_second_moments(kind, k):
    model = make_model(kind)
    opt = _opt(model, update_freq=k)
    params = dict(model.named_parameters())
    rot = {n for n, p in params.items() if eigenbasis.rotatable(p)}
    assert rot
    L, R, v, va = {}, {}, {}, {}      # the oracle's factors, rotated v (rotatable weights), Adam's v (others)
    refreshed = 0
    for s, (x, y) in enumerate(_steps(kind, 12)):
        g = {n: t.mean(0) for n, t in per_sample_grads(model, x, y, "cross_entropy").items()}
        before = {n: (opt.state[params[n]]["prior_ql"].clone(), opt.state[params[n]]["prior_qr"].clone())
                  for n in rot if "prior_ql" in opt.state[params[n]]}
        opt.zero_grad()
        LOSSES["cross_entropy"](model(x), y).backward()
        opt.step()
        if s % k == 0:      # the kept s from the v of the steps before this one
            for b in opt.blocks:
                if s == 0 and any(n in rot for n in b.param_names):
                    assert b.curv.rows.prior is None, b.name       # the identity prior: no statistics yet
                    continue
                vs, bases = [], []
                for n in b.param_names:
                    if n in rot:
                        vs.append(v[n])
                        bases.append(before[n])
                    else:
                        vs.append(va[n] if n in va else g[n] ** 2)
                        bases.append(None)
                sq = [t.sqrt() for t in vs]
                mean = sum(t.sum() for t in sq) / sum(t.numel() for t in sq)
                for n, t, basis, op in zip(b.param_names, sq, bases, b.curv.rows.prior):
                    delta = torch.clamp(t / mean, min=FLOOR)
                    if basis is None:
                        assert rel_err(op, delta.reshape(op.shape) ** -0.5) < 1e-10, (s, n)
                    else:
                        assert isinstance(op, eigenbasis.Rotated), (s, n)
                        assert rel_err(op.q_out, basis[0]) < 1e-12 and rel_err(op.q_in, basis[1]) < 1e-12
                        assert rel_err(op.s, delta.reshape(op.s.shape) ** -0.5) < 1e-10, (s, n)
        # the oracle's own recursions after the step
        for n in params:
            if n not in rot:
                va[n] = g[n] ** 2 if n not in va else BETA * va[n] + (1 - BETA) * g[n] ** 2
                continue
            G = g[n].reshape(g[n].shape[0], -1)
            st = opt.state[params[n]]
            if n not in L:
                L[n], R[n] = (1 - SB) * G @ G.T, (1 - SB) * G.T @ G
                q_out, q_in = st["prior_ql"], st["prior_qr"]
                for q, f in ((q_out, G @ G.T), (q_in, G.T @ G)):    # the bases of the first gradient
                    off = q.T @ f @ q
                    assert float((off - torch.diag(torch.diagonal(off))).abs().max()) < 1e-10 * float(f.norm())
                v[n] = (q_out.T @ G @ q_in) ** 2
            else:
                L[n], R[n] = SB * L[n] + (1 - SB) * G @ G.T, SB * R[n] + (1 - SB) * G.T @ G
                q_out, q_in = before[n]
                v[n] = BETA * v[n] + (1 - BETA) * (q_out.T @ G @ q_in) ** 2
                new_out, new_in = st["prior_ql"], st["prior_qr"]
                if (s + 1) % eigenbasis.EVERY == 0:     # a refresh: the bases of L and R, v carried over
                    refreshed += 1
                    for q, f in ((new_out, L[n]), (new_in, R[n])):
                        assert rel_err(q.T @ q, torch.eye(q.shape[0], dtype=q.dtype)) < 1e-10
                        off = q.T @ f @ q
                        assert float((off - torch.diag(torch.diagonal(off))).abs().max()) < 1e-10 * float(f.norm())
                    v[n] = ((new_out.T @ q_out) ** 2) @ v[n] @ ((new_in.T @ q_in) ** 2).T
                else:
                    assert torch.equal(new_out, q_out) and torch.equal(new_in, q_in)
            assert rel_err(st["prior_l"], L[n]) < 1e-10 and rel_err(st["prior_r"], R[n]) < 1e-10, (s, n)
            assert rel_err(st["prior_v"].reshape(v[n].shape), v[n]) < 1e-10, (s, n)
    assert refreshed == len(rot)


def test_soap_prior_checkpoint_refuses_a_basis_that_is_not_orthonormal():
    model = make_model("tokens")
    opt = _opt(model, update_freq=1)
    for x, y in _steps("tokens", 2):        # step 1: the first rotated prior
        opt.zero_grad()
        LOSSES["cross_entropy"](model(x), y).backward()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    entry = next(e for e in sd["tengrad"]["blocks"].values()
                 if e.get("prior") and any(isinstance(t, dict) for t in e["prior"]))
    rot = next(t for t in entry["prior"] if isinstance(t, dict))
    rot["q_out"] = rot["q_out"] * 2.0
    with pytest.raises(Exception, match="not orthonormal"):
        _opt(copy.deepcopy(model), update_freq=1).load_state_dict(sd)


def test_soap_prior_blocks_over_the_jacobian_budget_keep_the_identity_with_a_note():
    model = make_model("mlp")
    opt = _opt(model, max_jacobian_numel=0)
    x, y = _steps("mlp", 1)[0]
    LOSSES["cross_entropy"](model(x), y).backward()
    opt.step()
    text = opt.explain()
    assert "identity prior" in text and "eigenbasis prior rotates explicit rows only" in text, text


def test_explain_names_the_eigenbasis_prior():
    """explain(): the identity at step 0 with the reason, then the eigenbasis for blocks with a weight and the
    diagonal for the LayerNorm."""
    model = make_model("tokens")
    opt = _opt(model, update_freq=1)
    for s, (x, y) in enumerate(_steps("tokens", 2)):
        opt.zero_grad()
        LOSSES["cross_entropy"](model(x), y).backward()
        opt.step()
        line = opt.explain().split("block lin1 ")[1].split("\n")[0]
        assert ("no eigenbasis before the first step" in line) if s == 0 else ("eigenbasis D" in line), (s, line)
    assert "diagonal D" in opt.explain().split("block norm ")[1].split("\n")[0]


def test_soap_prior_on_a_tied_transformer_is_the_exact_step():
    """Embedding + nn.TransformerEncoder (packed in_proj, out_proj) + head tied to the embedding: the
    eigenbasis of in_proj_weight [3E, E] and of the tied weight (summed over its two uses), against the dense
    solve with D built from the kept bases; steps 1-3 rotated (step 0 the identity)."""
    torch.manual_seed(0)
    model = TiedEncoderLM(batch_first=True).double()
    oracle = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # out_bias: fallback until the tied head reads it
        opt = TENGraD(model, LR, DAMPING, momentum=0.0, kl_clip=None, check=True, prior="soap", update_freq=1, step_rule="natural")
    names = [n for n, p in oracle.named_parameters() if p.requires_grad]
    shapes = {n: p.shape for n, p in oracle.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    for s in range(4):
        (ids,), y = ids_batch(gen)
        oracle.load_state_dict(model.state_dict())
        rows = per_sample_grads(oracle, (ids,), y, lm_loss)
        g = {n: t.mean(0) for n, t in rows.items()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        lm_loss(model(ids), y).backward()
        opt.step()
        kept = {n: o for b in opt.blocks if b.curv.rows.prior is not None
                for n, o in zip(b.param_names, b.curv.rows.prior)}
        rotated = {n for n, o in kept.items() if isinstance(o, eigenbasis.Rotated)}
        assert (not rotated) if s == 0 else {"emb.weight", "enc.layers.0.self_attn.in_proj_weight"} <= rotated, s
        d = dense_directions(fisher_from_grads(rows, names), names, shapes, g, [b.param_names for b in opt.blocks],
                             DAMPING, [n for n, _ in opt.fallback], prior={n: kept_prior_matrix(o) for n, o in kept.items()})
        for n in names:
            err = rel_err(model.get_parameter(n).detach() - before[n], -LR * d[n])
            assert err < 1e-8, (s, n, err)


def test_a_weight_whose_eigenbasis_costs_more_than_its_layer_keeps_the_diagonal_and_the_choice_sticks():
    """eigenbasis.worth_rotating: SOAP's per-step work on a weight [o, n], ~8 o n (o + n) flops, against
    ROTATE_SHARE of its layer's forward and backward, 6 (rows) o n. A Linear(256, 256) fed 8 rows a step
    (8 * 33.5 M against 0.3 * 3.1 M flops) keeps Adam's diagonal (Adafactor's Kronecker form on its x and gy);
    fed 8 sequences of 512 positions it takes the eigenbasis. Decided at the first curvature step, kept
    when the batch changes (the factors and bases are the weight's state from then on)."""
    from torch import nn
    o = n = 256
    assert o * n * (o + n) > eigenbasis.ROTATE_FLOOR
    for positions, want in ((None, False), (512, True)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(n, o), nn.Tanh(), nn.Linear(o, 3)).double()
        opt = _opt(model, update_freq=1)
        shape = (8, n) if positions is None else (8, positions, n)
        rows = 8 * (positions or 1)
        assert eigenbasis.worth_rotating(model[0].weight, o, rows) is want
        gen = torch.Generator().manual_seed(1)
        for s in range(3):      # step 2 (a curvature step at update_freq 1): a batch that alone decides otherwise
            small = (1, 64, n) if positions else None
            big = (4096, n)
            x = torch.randn(*(shape if s < 2 else small if positions else big), generator=gen, dtype=torch.float64)
            y = torch.randint(0, 3, x.shape[:-1], generator=gen)
            opt.zero_grad()
            LOSSES["cross_entropy"](model(x).reshape(-1, 3), y.reshape(-1)).backward()
            opt.step()
        st = opt.state[model[0].weight]
        assert eigenbasis.worth_rotating(model[0].weight, o, 64 if positions else 4096) is not want
        assert st[eigenbasis.ROTATE] is want and ("prior_ql" in st) is want        # step 2's batch: unchanged
        assert tuple(st["prior_v"].shape) == ((o, n) if want else tuple(model[0].weight.shape))
        assert st["prior_v"].dim() == 2
        assert eigenbasis.rotates(opt.state, model[2].weight)      # the small head rotates (ROTATE_FLOOR)


def test_a_fallback_weight_keeps_adams_diagonal_under_the_eigenbasis_prior():
    """A 2-D parameter in no block (a GRU's, stepped by Adam's rule outside the rows) was rotated by the
    moments' update while its step read v as Adam's diagonal: its v must be Adam's, g^2 averaged, in its
    own coordinates (checked against the oracle's), and it gets no eigenbasis."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(4, 6, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.gru(x)[0][:, -1])

    torch.manual_seed(0)
    model = Net().double()
    opt = _opt(model, step_rule="adam")
    w = model.gru.weight_ih_l0
    assert any(p is w for _, p in opt.fallback)
    gen = torch.Generator().manual_seed(2)
    v = None
    for _ in range(3):
        x, y = torch.randn(8, 5, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        LOSSES["cross_entropy"](model(x), y).backward()
        g = w.grad.detach().clone()
        opt.step()
        v = g ** 2 if v is None else BETA * v + (1 - BETA) * g ** 2
    st = opt.state[w]
    assert not any(k in st for k in ("prior_ql", "prior_l", eigenbasis.ROTATE))
    assert rel_err(st["prior_v"], v) < 1e-12


def test_a_sequence_first_use_is_priced_by_all_its_output_elements():
    """MultiheadAttention's in-projection runs sequence-first inside the module ([T, m, 3d] outputs): the
    rotation decision prices the layer by every output element of the batch, not by dimension 0's slice
    (which counted m positions per 'sample' and turned a 384 x 128 in-projection at m = 32, T = 128 to the
    diagonal prior, 100x the step of its rotated twin at step 0)."""
    from torch import nn
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(128, 4, batch_first=True)
    w = attn.in_proj_weight
    assert eigenbasis.worth_rotating(w, 128 * 384, 32)          # priced by the whole batch: rotated
    assert not eigenbasis.worth_rotating(w, 32 * 384, 32)       # dimension 0's slice: would not be
    opt = _opt(attn)
    x = torch.randn(32, 128, 128, generator=torch.Generator().manual_seed(3))
    opt.zero_grad()
    attn(x, x, x, need_weights=False)[0].square().mean().backward()
    opt.step()
    assert eigenbasis.rotates(opt.state, w)
