"""Template: the per-sample Jacobian and the weight gradient, one implicit-unfold GEMM.

    J[n, g, v, I]     = sum_C G[n, g, v, C] U[n, g, C, I]              (paper, Lemma 1)
    (J^T u)[g, v, I]  = sum_n u[n] sum_C G[n, g, v, C] U[n, g, C, I]   (the weight gradient, G u)

Grid: (sample chunks x N_g, v tiles, I tiles). WEIGHTED=False: one sample per program, the tile
stored at ``out + n * out_stride_n``; WEIGHTED=True: ``samples_per_prog`` samples per program,
weighted by u and atomically added (split over samples for parallelism). U tiles come from
``u_tile``: the unfolded input is never stored.
"""

TEMPLATE = '''

@triton.autotune(configs=JACOBIAN_CONFIGS, key=["m", "samples_per_prog"], reset_to_zero=["out_ptr"])
@triton.jit
def jacobian_kernel(x_ptr, g_ptr, u_ptr, out_ptr, m, samples_per_prog, out_stride_n,
                    WEIGHTED: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_I: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """J[n, g, v, I] = sum_C G[n, g, v, C] U[n, g, C, I]; WEIGHTED: sum_n u[n] J[n, g, v, I]."""
    chunk = tl.program_id(0) // ${N_G}
    g = tl.program_id(0) % ${N_G}
    v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    i = tl.program_id(2) * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_V, BLOCK_I), ACC)
    first = chunk * samples_per_prog
    for n in range(first, tl.minimum(first + samples_per_prog, m)):
        part = tl.zeros((BLOCK_V, BLOCK_I), ACC)
        for c0 in range(0, ${N_C}, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            gt = g_tile(g_ptr, n, g, v[:, None], c[None, :])  # [BLOCK_V, BLOCK_C]
            ut = u_tile(x_ptr, n, g, c[:, None], i[None, :])  # [BLOCK_C, BLOCK_I]
            part += mm(gt, ut)
        if WEIGHTED:
            part *= tl.load(u_ptr + n).to(ACC)
        acc += part
    off, mask = p_offsets(g, v[:, None], i[None, :])
    if WEIGHTED:
        tl.atomic_add(out_ptr + off, acc, mask=mask)
    else:
        tl.store(out_ptr + chunk * out_stride_n + off, acc, mask=mask)
'''
