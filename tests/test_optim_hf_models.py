"""Hugging Face models built from tiny configs (random init, nothing downloaded), called as their users
call them (``model(**batch)``, ``out.loss.backward()``), trained with ``TENGraD(model)`` and no
``batch_dim``: every parameter is in an exact block (``opt.fallback`` empty) and a curvature step and a
reuse step equal the dense float64 oracle (support/keyword_oracle.py: per-sample gradients, one
autograd pass per sample on a float64 copy).

What each model exercises: GPT-2 - Conv1D's ``torch.addmm`` on batch-and-sequence-flattened rows
(capture/sample.py ``unflatten``), position ids [1, T] broadcast over the batch (``expand_batch``), the
tied ``lm_head``; BERT - position ids [1, T], a classification head; Llama - ``LlamaRMSNorm``'s
``weight * x`` (an elementwise use); ViT - ``cls_token.expand`` and ``+ position_embeddings`` (a
parameter placed into the activations).
"""
from __future__ import annotations

import pytest
import torch

from support.keyword_oracle import curvature_and_reuse

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")

V, T, B, D = 64, 8, 4, 16


def _ids(gen):
    return torch.randint(0, V, (B, T), generator=gen)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=D, n_inner=2 * D, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), lambda g: (lambda ids: {"input_ids": ids, "labels": ids})(_ids(g))


def bert():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=2 * D, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3)
    return (transformers.BertForSequenceClassification(cfg),
            lambda g: {"input_ids": _ids(g), "labels": torch.randint(0, 3, (B,), generator=g)})


def llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                   bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg), lambda g: (lambda ids: {"input_ids": ids, "labels": ids})(_ids(g))


def vit():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=D, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=2 * D, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, num_labels=3)
    return (transformers.ViTForImageClassification(cfg),
            lambda g: {"pixel_values": torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64),
                       "labels": torch.randint(0, 3, (B,), generator=g)})


@pytest.mark.parametrize("build", [gpt2, bert, llama, vit], ids=lambda f: f.__name__)
def test_hf_model_steps_match_dense_oracle(build):
    torch.manual_seed(0)
    model, batch = build()
    model = model.double().train()
    gen = torch.Generator().manual_seed(1)
    opt, err = curvature_and_reuse(model, [batch(gen), batch(gen)])
    assert not opt.fallback, [n for n, _ in opt.fallback]
    assert err <= 1e-8, err
