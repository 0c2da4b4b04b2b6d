"""Template: the per-term operand helpers, where the spec's index maps become address arithmetic.

Every helper takes coordinates as tensors of any broadcastable shapes (the caller picks the tile's
orientation, e.g. ``c[:, None], i[None, :]`` for a [BLOCK_C, BLOCK_I] tile of U) and flat class
indices: ``g`` (group), ``v`` (free), ``c`` (common), ``i`` (independent), decomposed row-major
into the spec's indices by div/mod. Holes are the bodies, rendered from the spec and sizes.

    u_tile(x_ptr, sample, g, c, i)        U[sample, g, C=c, I=i], zero outside the input (padding)
    g_tile(g_ptr, sample, g, v, c)        G[sample, g, v, C=c]
    p_offsets(g, v, i)                    (offset, mask) of p[g, v, I=i] in the parameter layout
    ids_at(x_ptr, sample, g, c)           one-hot ids at the common coordinate (-1: none)
    c1_tile(x_ptr, s1, s2, g, c1, c2)     C1[s1, s2, g, c1, c2] = sum_I U[s1,g,c1,I] U[s2,g,c2,I]
    y_tile(x_ptr, p_ptr, sample, g, c, v) Y[sample, g, v, c] = sum_I U[sample,g,c,I] p[g,v,I]
"""

TEMPLATE = '''

@triton.jit
def u_tile(x_ptr, sample, g, c, i):
    """U[sample, g, C, I] (${u_source}) at flat common c and independent i; nothing is stored."""
${u_tile_body}


@triton.jit
def g_tile(g_ptr, sample, g, v, c):
    """G[sample, g, v, C]: the per-sample output gradient at flat free v and common c."""
${g_tile_body}


@triton.jit
def p_offsets(g, v, i):
    """(offset, mask) of p[g, v, I] in the parameter's own layout (${p_layout})."""
${p_offsets_body}


@triton.jit
def ids_at(x_ptr, sample, g, c):
    """One-hot terms: the integer ids at flat common c (-1 where out of range)."""
${ids_at_body}


@triton.jit
def c1_tile(x_ptr, s1, s2, g, c1, c2, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """C1[s1, s2, g, c1, c2] = sum_I U[s1, g, c1, I] U[s2, g, c2, I] as a [BLOCK_C, BLOCK_C] tile."""
${c1_tile_body}


@triton.jit
def y_tile(x_ptr, p_ptr, sample, g, c, v, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
           BLOCK_I: tl.constexpr):
    """Y[sample, g, v, c] = sum_I U[sample, g, c, I] p[g, v, I] as a [BLOCK_C, BLOCK_V] tile."""
${y_tile_body}
'''
