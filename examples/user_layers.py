"""Two layers declared from index notation alone: no new code in tengrad, only specs.

* ``TokenMixing`` (MLP-Mixer's token-mixing linear map across the sequence):
      y[n, t, d] = sum_s x[n, s, d] W[t, s] + b[t]
  roles: n batch, s independent, t free, d common.
* ``LocallyConnected1d`` (a convolution whose filter differs at every output position):
      y[n, o, l] = sum_{c,k} x[n, c, s*l + k] W[l, o, c, k]
  roles: n batch, l *group* appearing in an index map, o free, c and k independent.

Run ``python examples/user_layers.py`` to print their plans; ``tests/test_examples_user_layers.py`` checks them
against the torch.func oracle like every built-in layer.
"""
from __future__ import annotations

import torch
from torch import nn

import tengrad
from tengrad import LayerSpec, Term


class TokenMixing(nn.Module):
    def __init__(self, tokens_in: int, tokens_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(tokens_out, tokens_in) / tokens_in**0.5)
        self.bias = nn.Parameter(torch.zeros(tokens_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [n, s, d] -> [n, t, d]
        return torch.einsum("nsd,ts->ntd", x, self.weight) + self.bias[:, None]


class LocallyConnected1d(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, length_in: int, kernel: int, stride: int = 1):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.length_out = (length_in - kernel) // stride + 1
        self.weight = nn.Parameter(torch.randn(self.length_out, channels_out, channels_in, kernel) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [n, c, L] -> [n, o, l]
        patches = x.unfold(2, self.kernel, self.stride)  # [n, c, l, k]
        return torch.einsum("nclk,lock->nol", patches, self.weight)


tengrad.register_layer(TokenMixing, lambda m: [
    Term("weight", LayerSpec.parse("n s d, t s -> n t d", name="TokenMixing.weight")),
    Term("bias", LayerSpec.parse("n d, t -> n t d", name="TokenMixing.bias", source="ones")),
])
tengrad.register_layer(LocallyConnected1d, lambda m: [
    Term("weight", LayerSpec.parse("n c il, l o c k -> n o l", name="LocallyConnected1d.weight",
                                   maps={"il": "s*l + k"}, constants={"s": m.stride})),
])

if __name__ == "__main__":
    for module, shape in ((TokenMixing(64, 32), (128, 64, 256)), (LocallyConnected1d(8, 16, 40, 5, 2), (128, 8, 40))):
        plan = tengrad.compile(module)
        x = torch.randn(shape)
        print(plan.sized(x.shape, module(x).shape))
        print()
