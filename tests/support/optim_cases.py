"""Models, batches and losses of the optimizer tests (cases as data; the oracle is step_oracle.py).

``make_model(kind)``: "conv" (ConvSeqNet: grouped Conv2d, Conv1d, LayerNorm, Linear on a sequence and a
PReLU that no plan covers), "tokens" (TokenNet: Embedding, LayerNorm, two Linears) or "mlp" (Linear,
in-place ReLU, Linear), float64 unless asked. ``make_batch(kind, m, loss, gen)``: seeded inputs and
targets for them. The small Transformer LM of the model zoo (TiedEncoderLM, ids_batch, lm_loss) is
shared by the zoo and the staggered-curvature tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LOSSES", "ConvSeqNet", "TokenNet", "TokenLinears", "make_batch", "make_model", "perturb_parameters",
           "V", "E", "T", "N", "TiedEncoderLM", "ids_batch", "lm_loss"]

LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


class ConvSeqNet(nn.Module):
    """Conv2d(groups=2) -> Conv1d -> LayerNorm -> Linear on a sequence -> PReLU (no plan) -> mean."""

    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.conv1 = nn.Conv1d(6, 4, 3, stride=2)
        self.norm = nn.LayerNorm(4)
        self.lin = nn.Linear(4, 3)
        self.act = nn.PReLU()

    def forward(self, x):                                  # x [m, 4, 5, 5]
        h = torch.tanh(self.conv2(x)).flatten(2)            # [m, 6, 25]
        h = torch.tanh(self.conv1(h)).transpose(1, 2)       # [m, 12, 4]
        h = self.lin(self.norm(h))                          # [m, 12, 3]
        return self.act(h).mean(1)                          # [m, 3]


class TokenNet(nn.Module):
    """Embedding -> LayerNorm -> Linear on a sequence -> tanh -> mean -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)
        self.lin1 = nn.Linear(6, 5)
        self.lin2 = nn.Linear(5, 3)

    def forward(self, x):                                   # x [m, 7] token ids
        return self.lin2(torch.tanh(self.lin1(self.norm(self.emb(x)))).mean(1))


class TokenLinears(nn.Module):
    """Linears on [m, T, d] tokens (T = 3, d 12 -> 20 -> 20 -> 3, mean over T): the explicit J is the
    cheaper path for them (paths.py) and the larger form (P = d_in d_out > T (d_in + d_out))."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(12, 20), nn.Linear(20, 20), nn.Linear(20, 3)

    def forward(self, x):                                   # x [m, 3, 12]
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))).mean(1))


def make_batch(kind: str, m: int, loss: str, gen: torch.Generator, dtype=torch.float64):
    if kind == "conv":
        x = torch.randn(m, 4, 5, 5, generator=gen, dtype=dtype)
    elif kind == "mlp":
        x = torch.randn(m, 5, generator=gen, dtype=dtype)
    else:
        x = torch.randint(0, 10, (m, 7), generator=gen)
    if loss == "cross_entropy":
        y = torch.randint(0, 3, (m,), generator=gen)
    else:
        y = torch.randn(m, 3, generator=gen, dtype=dtype)
    return x, y


def make_model(kind: str, dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":   # an in-place activation right after a layer output
        model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))
    else:
        model = ConvSeqNet() if kind == "conv" else TokenNet()
    return model.to(dtype)


def perturb_parameters(model: nn.Module, gen: torch.Generator, scale: float = 0.3) -> None:
    """Move every parameter by scale * N(0, 1) (seeded): no layer keeps torch's default init (norm
    weights of exactly 1 and zero biases would hide index mistakes)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# ---------------------------------------------------------------- a small Transformer LM (the model zoo)
V, E, T, N = 11, 8, 5, 3       # vocabulary, d_model, sequence length, batch


class TiedEncoderLM(nn.Module):
    """Embedding + nn.TransformerEncoder + output head tied to the embedding (F.linear(h, emb.weight))."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(V, E)
        layer = nn.TransformerEncoderLayer(E, 2, 16, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out_bias = nn.Parameter(torch.randn(V) * 0.1)

    def forward(self, ids):                       # ids [N, T]
        h = self.emb(ids)
        if not self.batch_first:
            h = h.transpose(0, 1)                 # [T, N, E]
        h = self.enc(h)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return F.linear(h, self.emb.weight, self.out_bias)     # [N, T, V]


def lm_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def ids_batch(gen):
    return (torch.randint(0, V, (N, T), generator=gen),), torch.randint(0, V, (N, T), generator=gen)
