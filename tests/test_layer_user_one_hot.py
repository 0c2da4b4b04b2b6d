"""A user layer declared with a one-hot source compiles and matches the torch.func oracle.

``Lookup`` stores its table transposed (W[d, v]) and multiplies an explicit one-hot code by it, so
its spec ``n *t v, d v -> n *t d`` (one-hot index last in the parameter) differs from
nn.Embedding's; the compiler must get the integer input and the gathers from the operand kind, not
from the module class. Every order of every quantity, float64 and float32.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tengrad
from support.jacobian_oracle import compare_plan, per_sample_jacobian, trainable_params
from tengrad_ir import LayerSpec


class Lookup(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.vocab = vocab
        self.weight = nn.Parameter(torch.randn(dim, vocab))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hot = ids[..., None] == torch.arange(self.vocab, device=ids.device)
        return hot.to(self.weight.dtype) @ self.weight.t()


def lookup_terms(module: Lookup):
    return [tengrad.Term("weight", LayerSpec.parse("n *t v, d v -> n *t d", name="Lookup.weight",
                                                   source="one_hot", one_hot="v"))]


@pytest.fixture(scope="module", autouse=True)
def registered():
    tengrad.register_layer(Lookup, lookup_terms)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("ids_shape", [(4, 3), (5,)])
def test_user_one_hot_layer_against_oracle(dtype, tol, ids_shape):
    torch.manual_seed(1)
    mod = Lookup(6, 3).to(dtype)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 6, ids_shape, generator=gen)
    with torch.no_grad():
        gy = torch.randn(mod(ids).shape, generator=gen, dtype=torch.float64).to(dtype)
    mod64 = Lookup(6, 3).double()
    mod64.load_state_dict({k: v.double() for k, v in mod.state_dict().items()})
    J = per_sample_jacobian(mod64, ids, gy.double())
    p = [torch.randn(t.shape, generator=gen, dtype=dtype) for _, t in trainable_params(mod)]
    u = torch.randn(ids.shape[0], generator=gen, dtype=dtype)
    plan = tengrad.compile(mod)
    assert plan.reads_ids
    failures = compare_plan(plan, mod, ids, gy, J, p, u, tol)
    assert not failures, "\n".join(failures)
    assert {o for o in plan.orders("gram")} == {"direct", "factored"}


def test_user_one_hot_layer_refuses_float_input():
    mod = Lookup(6, 3)
    plan = tengrad.compile(mod)
    with pytest.raises(tengrad.ShapeError, match="Lookup.gram: x must hold integer ids for Lookup"):
        plan.gram(torch.randn(4, 3), torch.randn(4, 3, 3))
