"""A stand-in for ``tengrad.compile`` used by the optimizer tests only while the real one is missing.

``StandInLayer`` has the layer-plan interface of docs/api-contract.md (params, gram, jvp, vjp,
jacobian, orders) computed from torch.func per-sample gradients: row i of J is the gradient of
<gy_i, module(x_i)> with respect to the module's trainable parameters. It has no ``sized`` (no cost
model), so the optimizer keeps x/gy. The autouse fixture ``standin_compile`` patches it into the
``tengrad`` namespace only when ``tengrad.compile`` does not exist.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import tengrad

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.Embedding)


class StandInError(Exception):
    pass


class StandInUnsupported(StandInError):
    pass


class StandInLayer:
    def __init__(self, module: nn.Module):
        if type(module) not in SUPPORTED:
            raise StandInUnsupported(f"{type(module).__name__} is not registered")
        self.module = module
        self.params = tuple((n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad)

    def orders(self, quantity):
        return ("standin",)

    def jacobian(self, x, gy):
        names = [n for n, _ in self.params]
        dt = gy.dtype
        fixed = {n: p.detach().to(dt) for n, p in self.module.named_parameters(recurse=False)
                 if n not in names}
        free = {n: p.detach().to(dt) for n, p in self.params}
        x = x.to(dt) if x.is_floating_point() else x

        def inner(pd, xi, gyi):
            y = functional_call(self.module, {**pd, **fixed}, (xi.unsqueeze(0),))
            return (y * gyi.unsqueeze(0)).sum()

        rows = vmap(grad(inner), in_dims=(None, 0, 0))(free, x, gy)
        return tuple(rows[n] for n in names)

    def _flat(self, x, gy):
        return torch.cat([j.reshape(j.shape[0], -1) for j in self.jacobian(x, gy)], dim=1)

    def gram(self, x, gy, order=None):
        j = self._flat(x, gy)
        return j @ j.T

    def jvp(self, x, gy, p, order=None):
        return self._flat(x, gy) @ torch.cat([t.reshape(-1).to(gy.dtype) for t in p])

    def vjp(self, x, gy, u, order=None):
        flat = self._flat(x, gy).T @ u.to(gy.dtype)
        out, start = [], 0
        for _, p in self.params:
            out.append(flat[start:start + p.numel()].reshape(p.shape))
            start += p.numel()
        return tuple(out)


def standin(module, backend="torch"):
    return StandInLayer(module)


def real_compile_available() -> bool:
    return hasattr(tengrad, "compile")


@pytest.fixture(autouse=True)
def standin_compile(monkeypatch):
    if not real_compile_available():
        monkeypatch.setattr(tengrad, "compile", standin, raising=False)
        monkeypatch.setattr(tengrad, "UnsupportedLayerError", StandInUnsupported, raising=False)
    yield
