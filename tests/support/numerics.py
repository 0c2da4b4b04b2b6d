"""The suite's one error measure between a result and its reference."""
from __future__ import annotations

import torch

__all__ = ["rel_err"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against the reference ``b``: ||a - b|| / ||b|| (Frobenius norms of the
    whole tensors), computed in float64 whatever the dtypes of ``a`` and ``b``.

    When ||b|| is zero it returns the absolute error ||a - b|| (so a zero reference is met only by an
    ``a`` that is zero to the tolerance). NaN anywhere gives NaN, which fails every ``<=`` / ``<``
    check. The shapes must be equal (no broadcasting): a mismatch raises ValueError.
    """
    a = torch.as_tensor(a).detach().to(torch.float64)
    b = torch.as_tensor(b).detach().to(torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = torch.linalg.vector_norm(a - b).item()
    nb = torch.linalg.vector_norm(b).item()
    return diff / nb if nb > 0 else diff
