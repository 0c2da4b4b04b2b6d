"""``token_rows=c``: rows per position (issue 24, item 3; tengrad/optim/curvature/tokens.py).

Oracle 1, the step (float64, written from the definition, none of the optimizer's code): for a position
s = (i, t) the row of a block is j_s = m dL~/dtheta where L~ is the loss of a forward in which the
block's parameters act only at position s (every use of them: the embedding, its tied head, the q/k/v
slices; ``_through`` lets the gradient w.r.t. the parameters flow from that position's outputs only and
w.r.t. the layer's input from all). Over the positions S the optimizer drew (``opt.last_curvature_rows``),
F = (T / c) sum_{s in S} j_s j_s^T (c = |S|, every position when c >= m T), g the batch's gradient, and
the step is -lr (F_b + a I)^-1 g_b per block (support/step_oracle.py ``expected_steps``). "mc": L~ with the
labels the optimizer drew (``opt.last_labels``).

Oracle 2, the rows of torch's own layers (MultiheadAttention's packed projections, a tied head, pre-LN
TransformerEncoderLayer): at every position, sum_t R[(i, t)] / sqrt(T) is sample i's gradient of its
own loss (torch.func, vmap over grad).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.numerics import rel_err
from support.step_oracle import expected_steps, model_at, per_sample_grads
from tengrad.optim import TENGraD, TENGraDError

V, D, H, LR, DAMPING = 11, 6, 10, 0.3, 0.5


def _through(mask, fn, x, *ps):
    """fn(x, *ps), its gradient w.r.t. ``ps`` from the positions of ``mask`` [m, T] only."""
    frozen = fn(x, *[p.detach() for p in ps])
    mk = mask.reshape(*mask.shape, *[1] * (frozen.dim() - mask.dim())).to(frozen.dtype)
    return frozen + mk * (fn(x, *ps) - frozen)


class TokNet(nn.Module):
    """Embedding, causal attention from q/k/v row slices of one parameter, Linear, LayerNorm, Linear, a head
    tied to the embedding. ``mask``: the oracle's forward (the same values, parameters at the masked
    positions only)."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin1, self.norm, self.lin2 = nn.Embedding(V, D), nn.Linear(D, H), nn.LayerNorm(H), nn.Linear(H, D)
        self.qkv = nn.Parameter(torch.randn(3 * D, D) / math.sqrt(D))

    def forward(self, ids, mask=None):
        if mask is None:    # the modules and ops the optimizer captures
            e = self.emb(ids)
            q, k, v = (F.linear(e, self.qkv[j * D:(j + 1) * D]) for j in range(3))
            lin1, norm, lin2 = self.lin1, self.norm, self.lin2
        else:
            e = _through(mask, F.embedding, ids, self.emb.weight)
            q, k, v = (_through(mask, lambda x, w, j=j: F.linear(x, w[j * D:(j + 1) * D]), e, self.qkv)
                       for j in range(3))
            lin1 = lambda x: _through(mask, F.linear, x, self.lin1.weight, self.lin1.bias)
            norm = lambda x: _through(mask, lambda x, w, b: F.layer_norm(x, (H,), w, b, self.norm.eps), x,
                                      self.norm.weight, self.norm.bias)
            lin2 = lambda x: _through(mask, F.linear, x, self.lin2.weight, self.lin2.bias)
        t = ids.shape[1]
        causal = torch.full((t, t), float("-inf"), dtype=e.dtype).triu(1)
        h = e + torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D) + causal, -1) @ v
        h = h + lin2(norm(torch.tanh(lin1(h))))
        return F.linear(h, self.emb.weight) if mask is None else _through(mask, F.linear, h, self.emb.weight)


def _loss(out, y):
    return F.cross_entropy(out.reshape(-1, V), y.reshape(-1))


def oracle_fisher(model, ids, labels, positions):
    """F [P, P] = (T / c) sum_s j_s j_s^T over ``positions`` (flat i T + t), j_s = m dL~_s/dtheta."""
    m, t = ids.shape
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for s in positions:
        mask = torch.zeros(m * t, dtype=torch.float64)
        mask[s] = 1.0
        loss = _loss(model(ids, mask.reshape(m, t)), labels)
        rows.append(m * torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    R = torch.stack(rows)
    return t * R.T @ R / len(positions)


@pytest.mark.parametrize("fisher,c,k", [("empirical", 5, 1), ("empirical", 100, 2), ("mc", 7, 2)])
def test_token_rows_step_is_the_exact_step_of_the_positions_fisher(fisher, c, k):
    torch.manual_seed(0)
    model = TokNet().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # qkv read as slices: an op-level block (a warning at construction)
        opt = TENGraD(model, LR, DAMPING, momentum=0.0, update_freq=k, fisher=fisher, kl_clip=None, check=True,
                      token_rows=c, generator=torch.Generator().manual_seed(3), prior=None)
    gen = torch.Generator().manual_seed(5)
    names = [n for n, p in model.named_parameters()]
    F_kept, draws = None, []
    for s, (m, t) in enumerate([(3, 4), (2, 5), (4, 3)]):
        ids = torch.randint(0, V, (m, t), generator=gen)
        y = torch.randint(0, V, (m, t), generator=gen)
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        twin = model_at(model, theta)
        g = dict(zip(names, torch.autograd.grad(_loss(twin(ids), y), list(twin.parameters()))))
        opt.zero_grad()
        out = model(ids)
        if fisher == "empirical":
            _loss(out, y).backward()
        else:   # per-position labels: cross_entropy over logits [m, V, T]
            opt.backward(out.transpose(1, 2), y, loss="cross_entropy")
        opt.step()
        if s % k == 0:
            drawn = opt.last_curvature_rows
            assert set(drawn) == {(m, t)}, drawn
            pos = drawn[(m, t)]
            if c >= m * t:
                assert pos is None
                pos = torch.arange(m * t)
            else:
                assert pos.numel() == c and len(set(pos.tolist())) == c and int(pos.max()) < m * t
                draws.append(pos.tolist())
            labels = y if fisher == "empirical" else opt.last_labels
            F_kept = oracle_fisher(twin, ids, labels, pos.tolist())
        want = expected_steps(opt, model, F_kept, names, g, LR, DAMPING)
        for n, p in model.named_parameters():
            err = rel_err(p.detach() - theta[n], want[n])
            assert err < 1e-8, (s, n, err)
    assert all(b.curv.rows.tokens is not None for b in opt.blocks), opt.explain()
    assert len({tuple(d) for d in draws}) == len(draws)          # fresh positions per curvature step
    assert "token_rows" in opt.explain()


class TorchLM(nn.Module):
    """A pre-LN ``nn.TransformerEncoderLayer`` (MultiheadAttention's packed in_proj and its out_proj), a
    final LayerNorm, a head tied to the embedding."""

    def __init__(self, t: int):
        super().__init__()
        self.emb, self.pos = nn.Embedding(V, D), nn.Embedding(t, D)
        self.enc = nn.TransformerEncoderLayer(D, 2, 8, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(D)

    def forward(self, ids):
        t = ids.shape[1]
        h = self.emb(ids) + self.pos(torch.arange(t).expand_as(ids))
        h = self.enc(h, src_mask=nn.Transformer.generate_square_subsequent_mask(t, dtype=h.dtype), is_causal=True)
        return F.linear(self.norm(h), self.emb.weight)


def test_token_rows_of_torch_layers_sum_to_the_per_sample_gradients():
    torch.manual_seed(1)
    m, t = 3, 4
    model = TorchLM(t).double()
    opt = TENGraD(model, LR, DAMPING, momentum=0.0, update_freq=1, kl_clip=None, check=True, token_rows=m * t, prior=None)
    gen = torch.Generator().manual_seed(2)
    ids, y = torch.randint(0, V, (m, t), generator=gen), torch.randint(0, V, (m, t), generator=gen)
    twin = model_at(model, {n: p.detach().clone() for n, p in model.named_parameters()})
    per = per_sample_grads(twin, ids, y, lambda out, yi: _loss(out, yi))     # l_i: sample i's mean over T
    opt.zero_grad()
    _loss(model(ids), y).backward()
    opt.step()
    assert opt.last_curvature_rows == {(m, t): None}
    names = dict((id(p), n) for n, p in model.named_parameters())
    kinds = set()
    for b in opt.blocks:
        rows = b.curv.rows
        assert rows.tokens == t and b.curv.m == m * t, b.name
        R = (rows if rows.explicit_held else rows.explicit(b.plan)).matrix()            # [m T, P]
        got = R.reshape(m, t, -1).sum(1) / math.sqrt(t)
        want = torch.cat([per[names[id(p)]].reshape(m, -1) for p in b.params], dim=1)
        assert rel_err(got, want) < 1e-10, (b.name, rel_err(got, want))
        kinds.add(type(b.module).__name__)
    assert {"MultiheadAttention", "Embedding", "LayerNorm", "Linear"} <= kinds, kinds


def test_blocks_without_positions_keep_sample_rows():
    """A head on a pooled [m, d] input has no token dimension: its rows stay one per sample."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(V, D), nn.Linear(D, D), nn.Flatten(), nn.Linear(4 * D, 3)).double()
    opt = TENGraD(model, LR, DAMPING, momentum=0.0, update_freq=1, kl_clip=None, check=True, token_rows=5, prior=None)
    ids, y = torch.randint(0, V, (6, 4)), torch.randint(0, 3, (6,))
    opt.zero_grad()
    F.cross_entropy(model(ids), y).backward()
    opt.step()
    assert [b.curv.rows.tokens for b in opt.blocks] == [4, 4, None]
    assert [b.curv.m for b in opt.blocks] == [5, 5, 6]


@pytest.mark.parametrize("kwargs,match", [
    (dict(token_rows=0), "token_rows must be None or an integer >= 1"),
    (dict(token_rows=2.5), "token_rows must be None or an integer"),
    (dict(token_rows=True), "token_rows must be None or an integer"),
    (dict(token_rows=4, fisher="exact"), "token_rows needs fisher 'empirical' or 'mc'"),
])
def test_token_rows_is_checked(kwargs, match):
    with pytest.raises(TENGraDError, match=match):
        TENGraD(nn.Linear(3, 2), **{"prior": None, "step_rule": "natural", **kwargs})


def test_accumulation_over_forwards_is_refused_for_a_summed_block():
    torch.manual_seed(3)
    model = TokNet().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, LR, DAMPING, update_freq=1, token_rows=4, prior=None)
    opt.zero_grad()
    for _ in range(2):
        ids, y = torch.randint(0, V, (2, 3)), torch.randint(0, V, (2, 3))
        (_loss(model(ids), y) / 2).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TENGraDError, match="layer 'emb'.*2 forward passes.*token_rows"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_rows_per_position_survive_a_checkpoint():
    """state_dict / load_state_dict keep the rows per position (T) with the kept curvature: the next
    reuse step of the loaded copy equals the original's."""
    torch.manual_seed(4)
    model = TorchLM(4).double()
    opt = TENGraD(model, LR, DAMPING, update_freq=3, kl_clip=None, token_rows=5, generator=torch.Generator().manual_seed(1), prior=None)
    gen = torch.Generator().manual_seed(6)
    ids, y = torch.randint(0, V, (3, 4), generator=gen), torch.randint(0, V, (3, 4), generator=gen)
    opt.zero_grad()
    _loss(model(ids), y).backward()
    opt.step()
    twin = model_at(model, {n: p.detach().clone() for n, p in model.named_parameters()})
    opt2 = TENGraD(twin, LR, DAMPING, update_freq=3, kl_clip=None, token_rows=5, prior=None)
    opt2.load_state_dict(opt.state_dict())
    assert [b.curv.rows.tokens for b in opt2.blocks] == [4] * len(opt.blocks)
    for o, mdl in ((opt, model), (opt2, twin)):
        o.zero_grad()
        _loss(mdl(ids), y).backward()
        o.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert rel_err(q.detach(), p.detach()) < 1e-12, n
    bad = opt.state_dict()
    next(iter(bad["tengrad"]["blocks"].values()))["tokens"] = 1
    with pytest.raises(TENGraDError, match="'tokens' must be None or the positions per sample"):
        opt2.load_state_dict(bad)
