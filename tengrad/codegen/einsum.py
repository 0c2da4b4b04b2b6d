"""Named-index einsum on torch tensors: ``contract(out, (t1, idx1), (t2, idx2), ...)``."""
from __future__ import annotations

import opt_einsum
import torch


def equation(out: tuple[str, ...], *index_lists: tuple[str, ...]) -> str:
    names = list(dict.fromkeys([i for idx in index_lists for i in idx] + list(out)))
    if len(names) > 52:
        raise ValueError(f"einsum with {len(names)} indices exceeds the 52 letters available")
    table = {n: chr(ord("a") + k) if k < 26 else chr(ord("A") + k - 26) for k, n in enumerate(names)}
    return ",".join("".join(table[i] for i in idx) for idx in index_lists) + "->" + "".join(table[i] for i in out)


def contract(out: tuple[str, ...], *operands: tuple[torch.Tensor, tuple[str, ...]], optimize="auto") -> torch.Tensor:
    """``out[...] = sum prod operands`` over named indices (opt_einsum picks the pairwise path)."""
    eq = equation(out, *(idx for _, idx in operands))
    tensors = [t for t, _ in operands]
    if len(tensors) <= 2:
        return torch.einsum(eq, *tensors)
    return opt_einsum.contract(eq, *tensors, optimize=optimize, backend="torch")
