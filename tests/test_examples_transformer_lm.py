"""examples/transformer_lm.py: a Transformer LM with a tied output embedding trains with TENGraD, every
parameter in an exact block (the first step's consistency check J^T 1/m == grad runs on each)."""
import importlib.util
import pathlib
import warnings

import torch

_path = pathlib.Path(__file__).parents[1] / "examples" / "transformer_lm.py"
_spec = importlib.util.spec_from_file_location("transformer_lm", _path)
transformer_lm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(transformer_lm)


def test_transformer_lm_with_tied_head_trains_and_has_no_fallback():
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # no fallback warning: every parameter has a block
        # 32 steps: at the default kl_clip 3e-3 (1e-2 before) the loss passes 2.0 after about 26
        model, opt, losses = transformer_lm.train(steps=32)
    assert not opt.fallback, opt.fallback
    blocks = {b.name: b for b in opt.blocks}
    assert len(blocks["emb"].uses) == 2                      # lookup + tied head
    assert "enc.layers.1.self_attn" in blocks and "enc.layers.1.self_attn.out_proj" in blocks
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.3 * first and last < 2.0, (first, last, losses)
    assert opt._check.checked >= set(blocks)           # every block passed J^T 1/m == grad
