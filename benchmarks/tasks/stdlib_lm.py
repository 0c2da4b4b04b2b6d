"""A byte-level causal Transformer LM on the standard library's source (tasks/stdlib_corpus.py).

Model: byte embedding (256 x d) plus a learned position embedding, ``layers`` pre-LN
``nn.TransformerEncoderLayer`` (batch_first, causal mask, ReLU, feed-forward 4d, no dropout), a final
LayerNorm and an output head tied to the byte embedding (``F.linear(h, emb.weight)``); both embeddings
start at N(0, 0.02^2), so the first loss is about ln 256 = 8 bits per byte. At the defaults
(d 128, 6 layers, 4 heads, context 128) it has 1.24 M parameters.

Batches: ``batch`` windows of context + 1 bytes at offsets drawn uniformly from the training bytes by a
generator seeded with the run's seed (x: the first ``context`` bytes, y: the next ones). Evaluation:
mean cross-entropy over every position of ``val_windows`` fixed windows spread evenly over the
validation bytes, in bits per byte (nats / ln 2); the target is a validation loss in bits per byte.
One "epoch" is as many predicted bytes as the training split holds.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import stdlib_corpus
from .base import Task


class ByteLM(nn.Module):
    def __init__(self, d: int = 128, layers: int = 6, heads: int = 4, context: int = 128):
        super().__init__()
        self.emb = nn.Embedding(256, d)
        self.pos = nn.Embedding(context, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        nn.init.normal_(self.emb.weight, std=0.02)     # GPT-2's scale: the tied head starts near uniform
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:          # ids [N, T] -> logits [N, T, 256]
        t = ids.shape[1]
        h = self.emb(ids) + self.pos(torch.arange(t).expand_as(ids))
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.enc(h, mask=mask, is_causal=True)
        return F.linear(self.norm(h), self.emb.weight)


def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all N * T positions (nats)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def batches(data, seed: int, batch: int, context: int):
    train = data[0]
    gen = torch.Generator().manual_seed(seed)
    span = torch.arange(context + 1)
    while True:
        start = torch.randint(0, len(train) - context - 1, (batch, 1), generator=gen)
        win = train[start + span].long()
        yield win[:, :-1], win[:, 1:]


def val_windows(val: torch.Tensor, n: int, context: int) -> torch.Tensor:
    """``n`` windows of context + 1 bytes at evenly spaced offsets of the validation bytes."""
    starts = torch.linspace(0, len(val) - context - 1, n).long().unsqueeze(1)
    return val[starts + torch.arange(context + 1)].long()


def evaluate(model, data, chunk: int = 64) -> dict:
    wins = data[2]
    was = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(wins), chunk):
            w = wins[i:i + chunk]
            total += loss(model(w[:, :-1]), w[:, 1:]).item() * len(w)
    model.train(was)
    nats = total / len(wins)
    return dict(val_loss=nats, val_bpb=nats / math.log(2))


def task(quick: bool = False, batch: int = 32, context: int = 128, d: int = 128, layers: int = 6,
         heads: int = 4, steps: int = 2000, eval_every: int = 100, n_val: int = 256) -> Task:
    max_bytes = 0
    if quick:
        batch, context, d, layers, heads, steps, eval_every, n_val, max_bytes = 8, 32, 32, 1, 2, 8, 4, 16, 200_000
    train, val, meta = stdlib_corpus.load(max_bytes=max_bytes)
    data = (train, val, val_windows(val, n_val, context))
    n_params = sum(p.numel() for p in ByteLM(d, layers, heads, context).parameters())
    per_epoch = len(train) / (batch * context)
    return Task(
        name="lm",
        title=f"byte LM (d {d}, {layers} layers, {heads} heads, context {context}, {n_params / 1e6:.2f} M "
              f"parameters) on the Python {meta['python']} stdlib source ({meta['train_bytes'] / 1e6:.1f} / "
              f"{meta['val_bytes'] / 1e6:.1f} MB), batch {batch}",
        load=lambda: data,
        model=lambda: ByteLM(d, layers, heads, context),
        batches=lambda dd, seed: batches(dd, seed, batch, context),
        loss=loss,
        evaluate=evaluate,
        metric="val_bpb", higher_is_better=False,
        targets=(3.0, 2.5, 2.2),
        steps=steps, eval_every=eval_every, steps_per_epoch=per_epoch,
        tune_steps=max(2, steps // 10) if not quick else 4,
        grids=dict(
            sgd=dict(lr=[0.03, 0.1, 0.3], weight_decay=[0.0, 1e-4]),
            adamw=dict(lr=[1e-3, 3e-3, 1e-2], weight_decay=[0.01, 0.1]),
            soap=dict(lr=[1e-3, 3e-3, 1e-2], weight_decay=[0.01, 0.1]),
            kfac=dict(lr=[0.01, 0.03, 0.1], damping=[0.01, 0.1, 1.0]),
            tengrad=dict(weight_decay=[0.0, 1e-4]), **{"tengrad-prior": dict(weight_decay=[0.0, 1e-4])},
            **{"tengrad-natural": dict(weight_decay=[0.0, 1e-4])},
            **{"tengrad-soap": dict(lr=[0.3, 1.0], weight_decay=[0.0, 1e-4])},
            **{"tengrad-tuned": dict(lr=[1e-3, 3e-3, 6e-3], damping=[0.03, 0.1, 0.3])}),
        fallback=dict(sgd=dict(lr=0.1), adamw=dict(lr=3e-3, weight_decay=0.1), soap=dict(lr=3e-3, weight_decay=0.1),
                      kfac=dict(lr=0.03, damping=0.1), tengrad={},
                      **{"tengrad-tuned": {}, "tengrad-natural": {}, "tengrad-prior": {},
                         "tengrad-soap": dict(lr=1.0)}),
        acceptance=dict(target=2.5, ratio=0.9, peers=["adamw"]),
        settings=dict(corpus=meta, batch=batch, context=context, d=d, layers=layers, heads=heads,
                      parameters=n_params, steps=steps, eval_every=eval_every, val_windows=n_val),
    )
