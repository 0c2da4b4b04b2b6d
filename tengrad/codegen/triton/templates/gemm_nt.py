"""Template: C[a, b] = sum_k A[a, k] B[b, k] for any strides, split over k (atomic adds).

Used as K = J J^T (direct Gram), J p (direct) and J^T u (direct, A = u as one row, B = J^T).
SYMMETRIC (A is B, square tiles): only tiles on and above the diagonal are computed; an
off-diagonal tile is also added transposed below it (about half the work for K = J J^T).
"""

TEMPLATE = '''

@triton.autotune(configs=GEMM_CONFIGS, key=["M", "N", "K"], reset_to_zero=["c_ptr"])
@triton.jit
def gemm_nt_kernel(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bn, s_bk, s_cm, s_cn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr, SYMMETRIC: tl.constexpr):
    """C[a, b] += sum_{k in this program's split} A[a, k] B[b, k]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    first = tl.program_id(2) * per_split
    last = tl.minimum(first + per_split, K)
    if SYMMETRIC:  # tiles below the diagonal: nothing to do, their mirror image adds them
        last = tl.where(tl.program_id(1) < tl.program_id(0), first, last)
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for k0 in range(first, last, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * s_am + k[None, :] * s_ak,
                    mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0).to(ACC)
        b = tl.load(b_ptr + k[:, None] * s_bk + cols[None, :] * s_bn,
                    mask=(k[:, None] < K) & (cols[None, :] < N), other=0.0).to(ACC)
        acc += mm(a, b)
    tl.atomic_add(c_ptr + rows[:, None] * s_cm + cols[None, :] * s_cn, acc,
                  mask=(rows[:, None] < M) & (cols[None, :] < N))
    if SYMMETRIC:
        if tl.program_id(1) > tl.program_id(0):  # an off-diagonal tile: add its mirror image too
            tl.atomic_add(c_ptr + cols[None, :] * s_cm + rows[:, None] * s_cn, acc,
                          mask=(rows[:, None] < M) & (cols[None, :] < N))
'''
