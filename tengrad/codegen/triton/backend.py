"""The triton backend's step table: which IR steps it runs, and with which generated kernel.

The kernels are fused: one kernel covers several steps (the factored Gram's C1, C2 and K are one
``gram_factored_kernel``; the unfolding is address arithmetic inside every kernel). A step that
only feeds a fused kernel is *deferred* (its handler records it and computes nothing); the step
that completes the group launches the kernel. Keys are ``step.key`` = (op, result, inputs), so the
table lists exactly the steps of the orders it can run; ``factored_raw``'s raw covariance R and its
unfolding are absent, so a triton plan never chooses that order.
"""
from __future__ import annotations


from tengrad_ir import LayerSpec, Step

from ...errors import TengradError

_J_FROM = [("contract", "J", ("G", "X")), ("contract", "J", ("G", "U")), ("contract", "J", ("G",)),
           ("conv_weight_grad", "J", ("X", "G")), ("one_hot_scatter", "J", ("X", "G"))]
_C1 = [("contract", "C1", ("X", "X")), ("contract", "C1", ("U", "U")), ("one_hot_equal", "C1", ("X", "X"))]
_Y = [("contract", "Y", ("X", "p")), ("contract", "Y", ("U", "p")), ("conv_forward", "Y", ("X", "p")),
      ("one_hot_gather", "Y", ("X", "p"))]
_JTU_WEIGHTED = [("contract", "JTu", ("Gu", "X")), ("contract", "JTu", ("Gu", "U")), ("contract", "JTu", ("Gu",)),
                 ("conv_weight_grad", "JTu", ("X", "Gu")), ("one_hot_scatter", "JTu", ("X", "Gu"))]


def _deferred(run, step, env):
    return None


def _jacobian(run, step, env):
    return run.jacobian_acc()


def _gram_direct(run, step, env):
    j, n_p = env["J"], run.n_params
    return run.gemm_nt(j, j, run.m, run.m, n_p, (n_p, 1), (n_p, 1), symmetric=True)


def _jvp_direct(run, step, env):
    j, n_p = env["J"], run.n_params
    return run.gemm_nt(j, env["p"].reshape(-1).contiguous(), run.m, 1, n_p, (n_p, 1), (0, 1))[:, 0]


def _vjp_direct(run, step, env):
    j, n_p = env["J"], run.n_params
    return run.gemm_nt(env["u"].contiguous(), j, 1, n_p, run.m, (0, 1), (1, n_p))[0]


def _gram_factored(run, step, env):
    return run.gram_factored()


def _jvp_forward(run, step, env):
    return run.jvp_forward(env["p"].reshape(-1).contiguous())


def _weight_grad(run, step, env):
    return run.weight_grad_acc(env["u"])


# key -> (handler, what runs it)
TABLE = {("unfold", "U", ("X",)): (_deferred, "no kernel: every kernel reads X through the index maps "
                                   "(address arithmetic, zero padding as load masks)")}
TABLE |= {k: (_jacobian, "jacobian_kernel: implicit-unfold GEMM per sample, J[n] = G[n] U[n]") for k in _J_FROM}
TABLE[("symmetric_gram", "K", ("J",))] = (_gram_direct, "gemm_nt_kernel: K = J J^T, split-K, upper tiles only")
TABLE |= {k: (_deferred, "fused into gram_factored_kernel (C1 tile on chip)") for k in _C1}
TABLE[("contract", "C2", ("G", "G"))] = (_deferred, "fused into gram_factored_kernel (C2 tile on chip)")
TABLE[("contract", "K", ("C1", "C2"))] = (_gram_factored, "gram_factored_kernel: K[n, n'] = sum C1 * C2, "
                                                         "one program per (n, n', g)")
TABLE[("contract", "K", ("C2",))] = (_gram_factored, "gram_factored_kernel: K[n, n'] = sum C2 (ones input)")
TABLE[("contract", "Jp", ("J", "p"))] = (_jvp_direct, "gemm_nt_kernel: J p")
TABLE[("contract", "JTu", ("u", "J"))] = (_vjp_direct, "gemm_nt_kernel: u^T J")
TABLE |= {k: (_deferred, "fused into jvp_forward_kernel (Y tile on chip)") for k in _Y}
TABLE[("contract", "Jp", ("Y", "G"))] = (_jvp_forward, "jvp_forward_kernel: Jp[n] = sum G[n] (U[n] p)")
TABLE[("contract", "Jp", ("G", "p"))] = (_jvp_forward, "jvp_forward_kernel: Jp[n] = sum G[n] p (ones input)")
TABLE[("contract", "Gu", ("u", "G"))] = (_deferred, "fused into jacobian_kernel WEIGHTED (u scales G in the tile)")
TABLE |= {k: (_weight_grad, "jacobian_kernel WEIGHTED: sum_n u[n] G[n] U[n], samples split, atomic adds")
          for k in _JTU_WEIGHTED}


def handler_for(spec: LayerSpec, step: Step):
    try:
        return TABLE[step.key][0]
    except KeyError:
        raise TengradError(f"{spec.name}: the triton backend has no kernel for step {step} "
                           f"({step.key}); plan with the triton backend to avoid it") from None


class TritonBackend:
    name = "triton"

    def supports(self, step: Step) -> bool:
        return step.key in TABLE

    def describe(self, step: Step, classes: dict[str, int] | None = None) -> str:
        return TABLE[step.key][1]

    def bind(self, spec, sizes, x, g):
        from .run import TritonTermRun
        return TritonTermRun(spec, sizes, x, g)


TRITON = TritonBackend()

__all__ = ["TRITON", "TritonBackend", "TABLE", "handler_for"]
