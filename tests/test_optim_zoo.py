"""Model zoo: Transformers with attention, tied heads and shared parameters, each step against the dense
float64 oracle d_b = (F_b + a I)^-1 g_b per block (support/step_oracle.py: F_b = R_b^T R_b / m, rows R_b =
per-sample gradients from torch.func on an independent copy of the model), and -g / a for the
fallback parameters. Small sizes (d_model 8, 2 heads, T 5, batch 3), dropout 0."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.numerics import rel_err
from support.optim_cases import E, N, T, V, TiedEncoderLM, ids_batch, lm_loss
from support.step_oracle import dense_directions, fisher_from_grads, per_sample_grads
from tengrad import TENGraD
from tengrad.optim.curvature.consistency import BatchDimensionError


class Seq2Seq(nn.Module):
    """nn.Transformer, sequence first (src [S, N, E], tgt [T, N, E]), with a Linear head."""

    def __init__(self):
        super().__init__()
        self.tr = nn.Transformer(E, 2, 1, 1, 16, dropout=0.0)
        self.head = nn.Linear(E, 4)

    def forward(self, src, tgt):
        return self.head(self.tr(src, tgt)).transpose(0, 1)      # [N, T, 4]


class GPT(nn.Module):
    """Hand-written causal attention; k through a free parameter (F.linear(h, wk)); the output head
    F.linear(h, emb.weight); a free positional parameter used by + (no spec: fallback)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.pos = nn.Parameter(torch.randn(T, E) * 0.1)
        self.ln1 = nn.LayerNorm(E)
        self.q = nn.Linear(E, E)
        self.wk = nn.Parameter(torch.randn(E, E) / math.sqrt(E))
        self.v = nn.Linear(E, E)
        self.proj = nn.Linear(E, E)
        self.ln2 = nn.LayerNorm(E)
        self.mlp = nn.Sequential(nn.Linear(E, 16), nn.GELU(), nn.Linear(16, E))
        self.lnf = nn.LayerNorm(E)

    def forward(self, ids):
        h = self.emb(ids) + self.pos
        a = self.ln1(h)
        q, k, v = self.q(a), F.linear(a, self.wk), self.v(a)
        att = (q @ k.transpose(1, 2)) / math.sqrt(E)
        mask = torch.triu(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool), 1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        h = h + self.proj(att @ v)
        h = h + self.mlp(self.ln2(h))
        return F.linear(self.lnf(h), self.emb.weight)


def expected_change(opt, oracle, inputs, dims, y, lr, damping):
    """{name: -lr d} with d = (F_b + a I)^-1 g_b per block of ``opt`` and g / a for its fallback: F_b from
    the per-sample gradients (torch.func) of ``oracle``, an independent copy of the model, on this batch."""
    rows = per_sample_grads(oracle, inputs, y, lm_loss, batch_dims=dims)
    names = [n for n, p in oracle.named_parameters() if p.requires_grad]
    d = dense_directions(fisher_from_grads(rows, names), names, {n: p.shape for n, p in oracle.named_parameters()},
                         {n: t.mean(0) for n, t in rows.items()}, [b.param_names for b in opt.blocks], damping,
                         [n for n, _ in opt.fallback])
    assert set(d) == set(names), set(names) ^ set(d)
    return {n: -lr * v for n, v in d.items()}


def train_against_oracle(make, inputs_fn, dims, steps=3, lr=0.2, damping=0.3, **kw):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # nn.Transformer's nested-tensor notice
        model = make().double()
    oracle = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(update_freq=1, kl_clip=None) | kw       # the exact per-step update the oracle forms
        opt = TENGraD(model, lr=lr, damping=damping, momentum=0.0, check=True, **{"prior": None, "step_rule": "natural", **kw})
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        inputs, y = inputs_fn(gen)
        oracle.load_state_dict(model.state_dict())
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        lm_loss(model(*inputs), y).backward()
        opt.step()
        # the blocks (and fallback) are final after the first step's capture
        want = expected_change(opt, oracle, inputs, dims, y, lr, damping)
        for n, p in model.named_parameters():
            err = rel_err(p.detach() - before[n], want[n])
            assert err <= 1e-8, (n, err)
    return opt


@pytest.mark.parametrize("batch_first", [True, False])
def test_tied_transformer_encoder_lm(batch_first):
    opt = train_against_oracle(lambda: TiedEncoderLM(batch_first), ids_batch, dims=(0,))
    assert not opt.fallback, opt.fallback
    names = {b.name: b for b in opt.blocks}
    assert "emb" in names and "out_bias" not in [n for n, _ in opt.fallback]
    emb = names["emb"]
    assert any("linear" in u for u in emb.uses) and any("embedding" not in u and "Embedding" in u or u == "emb"
                                                        for u in emb.uses), emb.uses
    attn = names["enc.layers.0.self_attn"]
    assert [n.split(".")[-1] for n in attn.param_names] == ["in_proj_weight", "in_proj_bias"]
    text = opt.explain()
    assert "uses:" in text and "enc.layers.0.self_attn.out_proj" in text


def test_nn_transformer_sequence_first_encoder_decoder():
    def batch(gen):
        src = torch.randn(T, N, E, generator=gen, dtype=torch.float64)
        tgt = torch.randn(4, N, E, generator=gen, dtype=torch.float64)
        return (src, tgt), torch.randint(0, 4, (N, 4), generator=gen)

    opt = train_against_oracle(Seq2Seq, batch, dims=(1, 1), batch_dim=1)
    assert not opt.fallback, opt.fallback
    cross = next(b for b in opt.blocks if b.name == "tr.decoder.layers.0.multihead_attn")
    assert len(cross.uses) == 2, cross.uses          # q rows and kv rows of in_proj_weight


def test_gpt_block_hand_written_attention_and_tied_head():
    opt = train_against_oracle(GPT, ids_batch, dims=(0,))
    assert not opt.fallback, opt.fallback      # h + pos: an elementwise use of a parameter (linear_ops.py)
    names = [b.name for b in opt.blocks]
    assert "wk" in names and "emb" in names and any("pos" in b.param_names for b in opt.blocks)


def test_ambiguous_batch_dimension_raises_naming_the_layer():
    torch.manual_seed(0)
    model = TiedEncoderLM(False).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, lr=0.1, damping=0.3, prior=None)
    ids = torch.randint(0, V, (T, T))          # T == N: [T, N, E] has two dims of size m
    lm_loss(model(ids), torch.randint(0, V, (T, T))).backward()
    with pytest.raises(BatchDimensionError, match=r"layer 'emb'.*dimensions \[0, 1\] all of size m = 5.*batch_dim"):
        opt.step()


class Twice(nn.Module):
    """One Linear applied to two inputs (a weight shared by two calls), batch first."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, E)
        self.twice = nn.Linear(E, E)
        self.out = nn.Linear(E, V)

    def forward(self, x):                       # x [N, T, 4]
        return self.out(self.twice(torch.tanh(self.twice(self.inp(x)))))


def test_linear_applied_twice_matches_oracle():
    def batch(gen):
        return (torch.randn(N, T, 4, generator=gen, dtype=torch.float64),), torch.randint(0, V, (N, T), generator=gen)

    opt = train_against_oracle(Twice, batch, dims=(0,))
    twice = next(b for b in opt.blocks if b.name == "twice")
    assert len(twice.uses) == 2 and not opt.fallback


# ---------------------------------------------------------------- an op a user registers
def scale_shift(x, w, b):
    """y[n, t, d] = x[n, t, d] w[d] + b[d], dispatching through __torch_function__ (so the mode sees it)."""
    from torch.overrides import handle_torch_function, has_torch_function_variadic
    if has_torch_function_variadic(x, w, b):
        return handle_torch_function(scale_shift, (x, w, b), x, w, b)
    return x * w + b


class ScaleShift(nn.Module):
    def __init__(self, d, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device))
        self.bias = nn.Parameter(torch.zeros(d, device=device))

    def forward(self, x):
        return scale_shift(x, self.weight, self.bias)


def _scale_shift_terms(module):
    from tengrad import LayerSpec, Term
    return [Term("weight", LayerSpec.parse("n *t d, d -> n *t d", name="ScaleShift.weight")),
            Term("bias", LayerSpec.parse("n *t d, d -> n *t d", name="ScaleShift.bias", source="ones"))]


class FreeScale(nn.Module):
    """Free parameters read by the registered op (no module owns them as a ScaleShift)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, E)
        self.g = nn.Parameter(torch.randn(E))
        self.s = nn.Parameter(torch.randn(E))
        self.out = nn.Linear(E, V)

    def forward(self, x):
        return self.out(torch.tanh(scale_shift(self.inp(x), self.g, self.s)))


def test_user_registered_op_gives_an_exact_block():
    import tengrad
    from tengrad.layers.ops import register_op
    tengrad.register_layer(ScaleShift, _scale_shift_terms)

    def build(x, w, b):
        return ScaleShift(w.shape[0], device="meta"), {"weight": w, "bias": b}

    register_op(scale_shift, build)

    def batch(gen):
        return (torch.randn(N, T, 4, generator=gen, dtype=torch.float64),), torch.randint(0, V, (N, T), generator=gen)

    opt = train_against_oracle(FreeScale, batch, dims=(0,))
    assert not opt.fallback and "g+s" in [b.name for b in opt.blocks], [b.name for b in opt.blocks]


class SeqFirstLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):                                           # [N, T, 4]
        return self.head(torch.tanh(self.lin(x.transpose(0, 1))).mean(0))


def test_declared_layer_dimension_resolves_t_equal_n_exactly():
    def batch(gen):                                                 # N = T = 3: ambiguous unless declared
        return (torch.randn(3, 3, 4, generator=gen, dtype=torch.float64),), torch.randint(0, 3, (3,), generator=gen)

    opt = train_against_oracle(SeqFirstLinear, batch, dims=(0,), batch_dim={"lin": 1})
    assert opt.layer_dims == {"lin": 1} and opt.batch_dim == 0


class AttnClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.attn = nn.MultiheadAttention(E, 2, batch_first=True)
        self.head = nn.Linear(E, 4)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))        # [N, 4]


def test_mc_fisher_rows_reach_op_level_uses():
    """fisher='mc': the extra backward with sampled labels reaches the uses captured at the op
    (MultiheadAttention's projections): rows = per-sample gradients for opt.last_labels."""
    torch.manual_seed(0)
    model = AttnClassifier().double()
    oracle = copy.deepcopy(model)
    lr, damping = 0.2, 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, lr=lr, damping=damping, momentum=0.0, fisher="mc", check=True,
                      update_freq=1, kl_clip=None, generator=torch.Generator().manual_seed(3), prior=None)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids, y = torch.randint(0, V, (N, T), generator=gen), torch.randint(0, 4, (N,), generator=gen)
        oracle.load_state_dict(model.state_dict())
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        opt.backward(model(ids), y, loss="cross_entropy")
        opt.step()
        assert not opt.fallback
        names = [n for n, _ in oracle.named_parameters()]
        g = {n: t.mean(0) for n, t in per_sample_grads(oracle, ids, y, "cross_entropy").items()}
        sampled = per_sample_grads(oracle, ids, opt.last_labels, "cross_entropy")      # rows for the mc labels
        d = dense_directions(fisher_from_grads(sampled, names), names,
                             {n: p.shape for n, p in oracle.named_parameters()}, g,
                             [b.param_names for b in opt.blocks], damping)
        for b in opt.blocks:
            for n in b.param_names:
                got = dict(model.named_parameters())[n].detach() - before[n]
                assert rel_err(got, -lr * d[n]) <= 1e-8, n


class FunctionalUpsample(nn.Module):
    """A ConvTranspose2d's and a GroupNorm's parameters applied through F.conv_transpose2d and
    F.group_norm (op-level capture), the same ConvTranspose2d weight also called as a module (two uses)."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)
        self.gn = nn.GroupNorm(1, 2)
        self.head = nn.Linear(2 * 8 * 8 * 2, 4)

    def forward(self, x):                                        # [N, 3, 4, 4]
        a = F.conv_transpose2d(x, self.up.weight, self.up.bias, stride=2, padding=1, output_padding=1)
        a = F.group_norm(torch.tanh(a), 1, self.gn.weight, self.gn.bias, 1e-5)
        b = torch.tanh(self.up(x))                               # [N, 2, 8, 8]
        return self.head(torch.cat([a, b], 1).flatten(1))


def test_functional_conv_transpose_and_group_norm_match_oracle():
    def batch(gen):
        return (torch.randn(N, 3, 4, 4, generator=gen, dtype=torch.float64),), torch.randint(0, 4, (N,), generator=gen)

    opt = train_against_oracle(FunctionalUpsample, batch, dims=(0,))
    blocks = {b.name: b for b in opt.blocks}
    assert not opt.fallback and len(blocks["up"].uses) == 2 and len(blocks["gn"].uses) == 1


class TransposedFree(nn.Module):
    """A free parameter read through a transposed view F.linear(h, W.T): not a row slice, so not a
    use; W stays in fallback and the rest is exact."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, E)
        self.W = nn.Parameter(torch.randn(E, V) / math.sqrt(E))

    def forward(self, x):
        return F.linear(torch.tanh(self.inp(x)), self.W.T)


def test_transposed_view_of_a_free_parameter_stays_fallback():
    def batch(gen):
        return (torch.randn(N, T, 4, generator=gen, dtype=torch.float64),), torch.randint(0, V, (N, T), generator=gen)

    opt = train_against_oracle(TransposedFree, batch, dims=(0,))
    assert [n for n, _ in opt.fallback] == ["W"] and [b.name for b in opt.blocks] == ["inp"]
