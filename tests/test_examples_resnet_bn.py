"""examples/resnet_bn.py: a ResNet with BatchNorm (training mode) trains with TENGraD on sklearn digits."""
import importlib.util
import pathlib

import torch
from torch import nn

_path = pathlib.Path(__file__).parents[1] / "examples" / "resnet_bn.py"
_spec = importlib.util.spec_from_file_location("resnet_bn", _path)
resnet_bn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(resnet_bn)


def test_resnet_with_batchnorm_loss_falls_over_30_steps():
    model, opt, losses, acc = resnet_bn.train(steps=30, batch=32, width=8)
    bn_blocks = [b.name for b in opt.blocks if isinstance(b.module, nn.BatchNorm2d)]
    assert len(bn_blocks) == 6 and not opt.fallback, (bn_blocks, opt.fallback)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert last < 0.5 * first, (first, last, losses)
    assert acc > 0.5, acc                        # chance is 0.1
