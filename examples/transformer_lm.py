"""A small Transformer language model trained by TENGraD: Embedding, nn.TransformerEncoderLayer
(causal mask) and an output head tied to the embedding (``F.linear(h, emb.weight)``).

Every parameter gets an exact Fisher block, found where the training forward uses it
(tengrad/optim/op_capture.py): the attention's ``in_proj_weight``/``in_proj_bias`` through the
``F.linear`` inside ``nn.MultiheadAttention``, ``out_proj`` through its ``F.linear`` on [T*N, E] rows,
and the embedding as one block with two uses (the lookup and the tied head), J = J_lookup + J_head.

The data is a toy language over 12 tokens: each sequence counts up from a random start (mod 12), so
the next token is determined by the current one and the loss can fall far below log 12 = 2.48.

    python examples/transformer_lm.py        # 40 steps, prints the loss
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import tengrad


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 12, d_model: int = 16, heads: int = 2, layers: int = 2, seq: int = 12):
        super().__init__()
        self.emb = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:          # ids [N, T] -> logits [N, T, vocab]
        t = ids.shape[1]
        h = self.emb(ids) + self.pos(torch.arange(t).expand_as(ids))   # per-sample positions
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.enc(h, mask=mask, is_causal=True)
        return F.linear(self.norm(h), self.emb.weight)              # tied output head


def batch(gen: torch.Generator, n: int = 16, seq: int = 12, vocab: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(0, vocab, (n, 1), generator=gen)
    seqs = (start + torch.arange(seq + 1)) % vocab
    return seqs[:, :-1], seqs[:, 1:]


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train(steps: int = 40, lr: float = 0.1, damping: float = 0.1, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyLM()
    # the paper's natural-gradient step (D = I) at its own lr: the defaults (prior="soap", step_rule="adam")
    # take SOAP's lr 3e-3, made for thousands of steps rather than this example's few dozen
    opt = tengrad.TENGraD(model, lr=lr, damping=damping, momentum=0.9, prior=None)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x, y = batch(gen)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model, opt, losses


if __name__ == "__main__":
    _, opt, losses = train()
    print(opt.explain())
    print("loss:", " ".join(f"{v:.3f}" for v in losses[::5]), f"... {losses[-1]:.3f}")
