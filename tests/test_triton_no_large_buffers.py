"""The triton backend never allocates an unfolded input nor an m^2 N_C^2 covariance tensor.

Two independent checks on a conv layer whose unfolded input (m N_C N_I) and covariances
(m^2 N_C^2) are both much larger than any legitimate buffer (x, G, J, K, p):

* every tensor passed to every kernel launch (``run.TRACE``) is at most the largest of those;
* every torch allocation made while the backend runs (``torch.empty``/``zeros``/``*_like`` and
  ``Tensor.new_*`` wrapped) is at most that size too.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

try:
    import triton  # noqa: F401
    from tengrad.codegen.triton import TritonTermRun, run as triton_run
except Exception as exc:  # noqa: BLE001
    print(f"skipping triton memory test: triton cannot be imported ({exc!r})")
    pytest.skip(f"triton cannot be imported: {exc!r}", allow_module_level=True)

import tengrad

pytestmark = pytest.mark.interpreter


def test_no_unfolded_input_and_no_covariance_tensor(monkeypatch):
    m = 2
    mod = nn.Conv2d(2, 2, 3, padding=1, bias=False)  # N_I = 18, N_C = 64, N_v = 2
    torch.manual_seed(0)
    x = torch.randn(m, 2, 8, 8)
    gy = torch.randn(m, 2, 8, 8)
    plan = tengrad.compile(mod)
    _, runs = plan._runs(x, gy)
    ref, _ = runs[0]
    n_c, n_i = 64, 18
    unfolded, covariance = m * n_c * n_i, m * m * n_c * n_c
    legit = max(x.numel(), gy.numel(), m * mod.weight.numel(), m * m)
    assert legit < min(unfolded, covariance)  # the sizes make the check meaningful

    sizes: list[int] = []

    def wrap(fn):
        def inner(*args, **kwargs):
            out = fn(*args, **kwargs)
            sizes.append(out.numel())
            return out
        return inner

    for fn in ("empty", "zeros", "ones", "empty_like", "zeros_like", "empty_strided"):
        monkeypatch.setattr(torch, fn, wrap(getattr(torch, fn)))
    for fn in ("new_empty", "new_zeros"):
        monkeypatch.setattr(torch.Tensor, fn, wrap(getattr(torch.Tensor, fn)))
    trace: list = []
    monkeypatch.setattr(triton_run, "TRACE", trace)

    t = TritonTermRun(ref.spec, ref.sizes, ref.x, ref.g)
    p, u = torch.randn(mod.weight.shape), torch.randn(m)
    results = [t.gram("direct"), t.gram("factored"), t.jvp(p, "direct"), t.jvp(p, "forward"),
               t.vjp(u, "direct"), t.vjp(u, "weight_grad"), t.jacobian()]
    assert all(torch.isfinite(r).all() for r in results)
    launched = [numel for _, args in trace for _, numel in args]
    assert {name for name, _ in trace} == {"jacobian_kernel", "gemm_nt_kernel", "gram_factored_kernel",
                                            "jvp_forward_kernel"}
    assert max(launched) <= legit, trace
    assert sizes and max(sizes) <= legit, sizes
