"""Autotune configs for the generated kernels, chosen from a term's sizes.

GEMM tiles are square (BLOCK_M == BLOCK_N) so that the symmetric J J^T can skip tiles below
the diagonal. Block sizes are powers of two of at least 16 (``tl.dot``'s minimum) and at most the next power of
two of the class they tile, so a tiny class never gets a huge tile. Under the interpreter
(``TRITON_INTERPRET=1``) every kernel gets exactly one config, so nothing is benchmarked.
"""
from __future__ import annotations

import triton


def block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _fmt(items: list[tuple[dict, int, int]]) -> str:
    seen, rows = set(), []
    for meta, warps, stages in items:
        key = (tuple(sorted(meta.items())), warps, stages)
        if key in seen:
            continue
        seen.add(key)
        rows.append(f"    triton.Config({meta!r}, num_warps={warps}, num_stages={stages}),")
    return "[\n" + "\n".join(rows) + "\n]"


def configs(layout, interpret: bool) -> dict[str, str]:
    """``{kernel: source of a list of triton.Config}`` for the layout's sizes."""
    n_v, n_i, n_c = layout.n("v"), layout.n("I"), layout.n("C")
    if interpret:
        return {
            "jacobian": _fmt([(dict(BLOCK_V=block(n_v, 64), BLOCK_I=block(n_i, 64), BLOCK_C=block(n_c, 64)), 4, 1)]),
            "gemm": _fmt([(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, SPLIT_K=1), 4, 1)]),
            "factored": _fmt([(dict(BLOCK_C=block(n_c, 64), BLOCK_V=block(n_v, 64), BLOCK_I=block(n_i, 64)), 4, 1)]),
            "forward": _fmt([(dict(BLOCK_C=block(n_c, 64), BLOCK_V=block(n_v, 64), BLOCK_I=block(n_i, 64)), 4, 1)]),
        }
    jac = [(dict(BLOCK_V=block(n_v, bv), BLOCK_I=block(n_i, bi), BLOCK_C=block(n_c, bc)), w, 3)
           for bv, bi, bc, w in [(64, 64, 32, 4), (128, 64, 32, 4), (64, 128, 32, 4), (128, 128, 32, 8),
                                 (32, 32, 64, 4)]]
    gemm = [(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk), w, 3)
            for bm, bn, bk, w in [(64, 64, 64, 4), (128, 128, 32, 8), (16, 16, 128, 4)]
            for sk in (1, 8, 64)]
    fact = [(dict(BLOCK_C=block(n_c, bc), BLOCK_V=block(n_v, bv), BLOCK_I=block(n_i, bi)), w, 2)
            for bc, bv, bi, w in [(32, 32, 32, 4), (64, 32, 32, 4), (64, 64, 64, 8), (16, 64, 64, 4)]]
    fwd = [(dict(BLOCK_C=block(n_c, bc), BLOCK_V=block(n_v, bv), BLOCK_I=block(n_i, bi)), w, 3)
           for bc, bv, bi, w in [(64, 64, 32, 4), (128, 64, 32, 8), (64, 128, 64, 8), (32, 32, 32, 4)]]
    return {"jacobian": _fmt(jac), "gemm": _fmt(gemm), "factored": _fmt(fact), "forward": _fmt(fwd)}
