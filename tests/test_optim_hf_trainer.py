"""Hugging Face's ``Trainer`` drives TENGraD as its users would: ``optimizers=(TENGraD(model), None)``, a
torch ``Dataset`` of tokens, gradient accumulation 2 and gradient clipping on; a tiny GPT-2 trained for
20 optimizer steps, its training loss falls."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")
pytest.importorskip("accelerate", reason="accelerate is not installed (Trainer needs it; pip install -e '.[test]')")

import tengrad  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    """Sequences of a repeating pattern (learnable), 8 tokens each."""

    def __init__(self, n=160, T=8, V=32, seed=0):
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(0, V, (n, 1), generator=gen)
        self.ids = (start + torch.arange(T)) % V

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_trains_tiny_gpt2_with_tengrad(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_inner=32, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, max_steps=20, max_grad_norm=1.0,
                                          logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                          disable_tqdm=True, dataloader_num_workers=0, seed=0)
    opt = tengrad.TENGraD(model, prior=None)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None))
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 20, trainer.state.log_history
    assert not opt.fallback, [n for n, _ in opt.fallback]      # every parameter an exact block
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
