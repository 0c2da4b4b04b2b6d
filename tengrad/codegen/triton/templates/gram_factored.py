"""Template: the factored Gram (paper, Theorem 2), flash-attention style.

    K[n, n'] = sum_{g, C, C'} C1[n, n', g, C, C'] * C2[n, n', g, C, C']
    C1 = sum_I U[n, g, C, I] U[n', g, C', I]      (c1_tile: from U tiles, ones or equal ids)
    C2 = sum_v G[n, g, v, C] G[n', g, v, C']

One program per (n <= n', g): for each (C, C') tile pair both covariance tiles are formed in
registers, multiplied elementwise and reduced, so the m^2 N_C^2 covariances never exist in memory.
"""

TEMPLATE = '''

@triton.autotune(configs=FACTORED_CONFIGS, key=["m"], reset_to_zero=["k_ptr"])
@triton.jit
def gram_factored_kernel(x_ptr, g_ptr, k_ptr, m, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
                         BLOCK_I: tl.constexpr):
    """K[n, n'] += sum_{C, C'} C1 * C2 over this program's group g (both K[n, n'] and K[n', n])."""
    n = tl.program_id(0)
    n2 = tl.program_id(1)
    g = tl.program_id(2)
    if n2 >= n:  # K is symmetric: one program per unordered pair
        total = tl.zeros((BLOCK_C,), ACC)
        for c0 in range(0, ${N_C}, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            for c20 in range(0, ${N_C}, BLOCK_C):
                c2 = c20 + tl.arange(0, BLOCK_C)
                cov_u = c1_tile(x_ptr, n, n2, g, c, c2, BLOCK_C, BLOCK_I)  # [BLOCK_C, BLOCK_C]
                cov_g = tl.zeros((BLOCK_C, BLOCK_C), ACC)
                for v0 in range(0, ${N_V}, BLOCK_V):
                    v = v0 + tl.arange(0, BLOCK_V)
                    ga = g_tile(g_ptr, n, g, v[:, None], c[None, :])  # [BLOCK_V, BLOCK_C]
                    gb = g_tile(g_ptr, n2, g, v[:, None], c2[None, :])
                    cov_g += mm(tl.trans(ga), gb)
                total += tl.sum(cov_u * cov_g, axis=1)
        k = tl.sum(total, axis=0)
        tl.atomic_add(k_ptr + n * m + n2, k)
        if n2 != n:
            tl.atomic_add(k_ptr + n2 * m + n, k)
'''
