"""Template: J p as the layer's own forward with weights p, then a per-sample inner product with G.

    (J p)[n] = sum_{g, v, C} G[n, g, v, C] Y[n, g, v, C],   Y = sum_I U[n, g, C, I] p[g, v, I]

Grid: (n x N_g, C tiles); Y tiles come from ``y_tile`` (an implicit-unfold GEMM, or a gather of
rows of p for one-hot input) and are never stored.
"""

TEMPLATE = '''

@triton.autotune(configs=FORWARD_CONFIGS, key=["m"], reset_to_zero=["out_ptr"])
@triton.jit
def jvp_forward_kernel(x_ptr, g_ptr, p_ptr, out_ptr, m, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_I: tl.constexpr):
    """(J p)[n] += sum_{v, C in this tile} G[n, g, v, C] Y[n, g, v, C]."""
    n = tl.program_id(0) // ${N_G}
    g = tl.program_id(0) % ${N_G}
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    total = tl.zeros((BLOCK_C,), ACC)
    for v0 in range(0, ${N_V}, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        y = y_tile(x_ptr, p_ptr, n, g, c, v, BLOCK_C, BLOCK_V, BLOCK_I)  # [BLOCK_C, BLOCK_V]
        gt = g_tile(g_ptr, n, g, v[None, :], c[:, None])  # [BLOCK_C, BLOCK_V]
        total += tl.sum(y * gt, axis=1)
    tl.atomic_add(out_ptr + n, tl.sum(total, axis=0))
'''
