"""``SpecShell``: a module made of specs, the layer of an op that is linear in a parameter but is no
``torch.nn`` module call (``torch.addmm(b, x, W)``, ``torch.einsum("btd,de->bte", x, W)``, ``x * w``).

Its terms are given, one per parameter: each a ``LayerSpec`` whose indices are explicit (no variadic
axis), the batch ``n`` first. Every input-source term reads the same input U (the op's operand as the
capture hands it over, sample first); a ``ones`` term (a bias) reads nothing. The forward is only
there for shape inference (``tengrad.compile`` runs it on the meta device): its output has the shape
the output axes give, from the sizes of U's and the parameters' indices,

    y[out...] = sum U[in...] W[param...]       (the einsum of the spec; never evaluated here)

so ``tengrad.compile(shell)`` plans the op's Gram, J p and J^T u as for any registered layer.
"""
from __future__ import annotations

import torch
from torch import nn

from tengrad_ir import LayerSpec
from tengrad_ir.notation import indices_of

from .registry import register_layer
from .term import Term


class SpecShell(nn.Module):
    """Parameters shaped ``shapes[name]`` (empty storage on ``device``), with ``specs[name]`` as their
    terms; ``SpecShell(...)(x)`` returns an empty tensor of the output's shape."""

    def __init__(self, specs: dict[str, LayerSpec], shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                 device) -> None:
        super().__init__()
        self.specs = dict(specs)
        for name in specs:
            self.register_parameter(name, nn.Parameter(torch.empty(shapes[name], dtype=dtype, device=device)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes: dict[str, int] = {}
        first = next((s for s in self.specs.values() if s.source == "input"), None)
        if first is not None:
            sizes.update(zip(indices_of(first.input_axes), x.shape))
        for name, s in self.specs.items():
            sizes.update(zip(indices_of(s.param_axes), getattr(self, name).shape))
        if first is None:
            sizes.setdefault("n", x.shape[0])
        out = next(iter(self.specs.values())).output_axes
        return x.new_empty([sizes[i] for i in indices_of(out)])


def shell_terms(shell: SpecShell) -> list[Term]:
    return [Term(name, spec) for name, spec in shell.specs.items()]


register_layer(SpecShell, shell_terms)
