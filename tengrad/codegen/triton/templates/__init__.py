"""Hand-written Triton templates with named ``${holes}`` (``string.Template``), filled by ``render``.

Each template is plain Triton source apart from its holes, so a generated module reads like a
tutorial kernel with the layer's index arithmetic pasted in:

=================  ===============================================================================
``header``         module docstring (the plan), imports, ``mm`` (the one tl.dot), autotune configs
``operands``       the per-term helpers: ``u_tile``, ``g_tile``, ``p_offsets``, ``ids_at``,
                   ``c1_tile``, ``y_tile`` (every index map lives here)
``jacobian``       J (one sample per program) and J^T u (weighted sum over samples), one kernel
``gemm_nt``        C = A B^T with any strides, split-K: K = J J^T, J p, J^T u from J
``gram_factored``  K from tiles of the two covariances, reduced on chip (flash-attention style)
``jvp_forward``    J p as the layer's forward with weights p, dotted with G per sample
=================  ===============================================================================
"""
from . import gemm_nt, gram_factored, header, jacobian, jvp_forward, operands

TEMPLATES = {
    "header": header.TEMPLATE,
    "operands": operands.TEMPLATE,
    "jacobian": jacobian.TEMPLATE,
    "gemm_nt": gemm_nt.TEMPLATE,
    "gram_factored": gram_factored.TEMPLATE,
    "jvp_forward": jvp_forward.TEMPLATE,
}
