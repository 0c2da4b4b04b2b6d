"""Hugging Face models for ``benchmarks/step.py --zoo`` (issue 22's rows), built from small configs
(random weights, nothing downloaded) and called as their users call them (keywords):

* ``hf_gpt2``: ``GPT2LMHeadModel`` (d 256, 4 layers, 4 heads, vocab 4096, context 128), batch 16, T 128;
  ``model(input_ids=x).logits``.
* ``hf_llama``: ``LlamaForCausalLM`` (d 256, 4 layers, 4 heads, MLP 688, vocab 4096), batch 16, T 128.
* ``hf_vit``: ``ViTForImageClassification`` (ViT-tiny: d 192, 12 layers, 3 heads, MLP 768, patch 8 on
  32x32, 10 classes), batch 32; ``model(pixel_values=x).logits``.

Same shape of return as ``zoo_models.build``: (factory, x, y, loss, size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAMES = ("hf_gpt2", "hf_llama", "hf_vit")


class Logits(nn.Module):
    """``model(**{key: x}).logits``: the model called with a keyword, as its library's users do."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x):
        return self.model(**{self.key: x}).logits


def _seq_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def build(name: str, seed: int = 0):
    import transformers as hf

    g = torch.Generator().manual_seed(seed)
    if name == "hf_gpt2":
        cfg = hf.GPT2Config(vocab_size=4096, n_positions=128, n_embd=256, n_layer=4, n_head=4, bos_token_id=0,
                             eos_token_id=0)
        make, key, batch = (lambda: hf.GPT2LMHeadModel(cfg)), "input_ids", 16
        x, y = torch.randint(0, 4096, (batch, 128), generator=g), torch.randint(0, 4096, (batch, 128), generator=g)
        loss, size = _seq_loss, "HF GPT2LMHeadModel (d 256, 4 layers, vocab 4096), batch 16, T 128"
    elif name == "hf_llama":
        cfg = hf.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
        make, key, batch = (lambda: hf.LlamaForCausalLM(cfg)), "input_ids", 16
        x, y = torch.randint(0, 4096, (batch, 128), generator=g), torch.randint(0, 4096, (batch, 128), generator=g)
        loss, size = _seq_loss, "HF LlamaForCausalLM (d 256, 4 layers, vocab 4096), batch 16, T 128"
    elif name == "hf_vit":
        cfg = hf.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=192, num_hidden_layers=12,
                           num_attention_heads=3, intermediate_size=768, num_labels=10)
        make, key, batch = (lambda: hf.ViTForImageClassification(cfg)), "pixel_values", 32
        x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
        loss, size = F.cross_entropy, "HF ViTForImageClassification (ViT-tiny, patch 8, 32x32), batch 32"
    else:
        raise ValueError(f"unknown model {name!r}: one of {NAMES}")

    def factory():
        torch.manual_seed(seed)
        return Logits(make(), key).train()
    return factory, x, y, loss, size
