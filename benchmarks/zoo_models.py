"""The models of issue 23's step-cost rows, in plain torch (no timm/transformers dependency).

Each ``build(name)`` returns (model factory, x, y, loss, one-line size) with a fixed random batch:

* ``resnet18``: the ResNet-18 layout (CIFAR stem: 3x3 conv, no max-pool; 4 stages of 2 BasicBlocks,
  BatchNorm, projected shortcuts) at width 16 (16-32-64-128), 32x32 RGB, 10 classes, batch 32.
* ``vit_tiny``: ViT-tiny (d 192, depth 12, 3 heads, MLP 768, pre-norm, patch 8 on 32x32: 16 patches +
  a class token, learned positions), timm's module layout (qkv and proj Linears), batch 32.
* ``gpt``: a GPT-2-like causal LM (token + position embeddings, pre-norm blocks with qkv/proj and a
  4x GELU MLP, final LayerNorm, head tied to the token embedding), batch 8, T 128; d, layers and
  vocabulary from the arguments (GPT-2 small is d 768, 12 layers, vocab 50257: too large for a
  2-core CPU run; the default is d 256, 4 layers, vocab 4096). Positions are given per sample
  ([batch, T]; a [T] position input works too since capture/sample.py ``prepend_batch``).
* ``mlp4096``: Linear 4096 -> 4096, ReLU, Linear 4096 -> 10, batch 512.
* ``3c1f``: the paper's 3C1F (tengrad.demo.model) at width 128, 28x28 grey, batch 128.
* ``hf_gpt2``, ``hf_llama``, ``hf_vit``: Hugging Face models from small configs (zoo_hf.py, issue 22).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tengrad.demo.model import three_c_one_f


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResNet18(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2 ** i
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(h.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, causal)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, d: int = 192, depth: int = 12, heads: int = 3, patch: int = 8, image: int = 32,
                 classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, d))
        self.blocks = nn.Sequential(*[Block(d, heads, False) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        return self.head(self.norm(self.blocks(h))[:, 0])


class GPT(nn.Module):
    def __init__(self, vocab: int = 4096, d: int = 256, layers: int = 4, heads: int = 4, T: int = 128) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.Sequential(*[Block(d, heads, True) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)   # [batch, T]: see the docstring
        h = self.wte(ids) + self.wpe(pos)
        return F.linear(self.norm(self.blocks(h)), self.wte.weight)      # tied head, as GPT-2


def seq_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


NAMES = ("resnet18", "vit_tiny", "gpt", "mlp4096", "3c1f", "hf_gpt2", "hf_llama", "hf_vit")


def build(name: str, seed: int = 0, gpt_d: int = 256, gpt_layers: int = 4, gpt_vocab: int = 4096):
    """(factory, x, y, loss, size): ``factory()`` builds the model with the same weights every call."""
    if name.startswith("hf_"):               # Hugging Face models (zoo_hf.py; transformers needed)
        from zoo_hf import build as build_hf
        return build_hf(name, seed)
    g = torch.Generator().manual_seed(seed)
    if name == "resnet18":
        make, batch = (lambda: ResNet18(16)), 32
        x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
        loss, size = F.cross_entropy, "ResNet-18 layout, width 16, 32x32, batch 32"
    elif name == "vit_tiny":
        make, batch = (lambda: ViT()), 32
        x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
        loss, size = F.cross_entropy, "ViT-tiny (d 192, depth 12, patch 8, 32x32), batch 32"
    elif name == "gpt":
        make, batch, T = (lambda: GPT(gpt_vocab, gpt_d, gpt_layers, max(1, gpt_d // 64))), 8, 128
        x = torch.randint(0, gpt_vocab, (batch, T), generator=g)
        y = torch.randint(0, gpt_vocab, (batch, T), generator=g)
        loss = seq_loss
        size = f"GPT-2-like LM (d {gpt_d}, {gpt_layers} layers, vocab {gpt_vocab}, tied head), batch 8, T 128"
    elif name == "mlp4096":
        make, batch = (lambda: nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))), 512
        x, y = torch.randn(batch, 4096, generator=g), torch.randint(0, 10, (batch,), generator=g)
        loss, size = F.cross_entropy, "MLP 4096 -> 4096 -> 10, batch 512"
    elif name == "3c1f":
        make, batch = (lambda: three_c_one_f(width=128)), 128
        x, y = torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)
        loss, size = F.cross_entropy, "3C1F width 128, 28x28, batch 128"
    else:
        raise ValueError(f"unknown model {name!r}: one of {NAMES}")

    def factory():
        torch.manual_seed(seed)
        return make().train()
    return factory, x, y, loss, size
