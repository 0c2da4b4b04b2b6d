"""The one record of the capture: a *use* of a block's parameters in a captured forward.

A use is one call that read a block's parameters: a module call captured at module level (the
block's own forward) or a functional op call seen at the op (``F.linear(h, emb.weight)``,
MultiheadAttention's projections, a row slice of ``in_proj_weight``). For a mean-reduced loss
L = (1/m) sum_i l_i it holds

    x      the op's input, detached                                      [.., m, ..]
    grad   dL/dy of the op's output y (ordinary backward; (1/m) dl_i/dy_i)  like y, or None
    rows   per-sample output gradients of the curvature passes ("mc"/"exact" Fisher), each like y
    plan   the compiled plan of the call (the block's own plan for a module call)
    parts  per plan parameter, where it sits in the block: (param, first row) or None for a plan
           parameter the block does not train; None for the whole list: the block's own plan
    fwd    which captured root forward made it (uses of several forwards in one step: accumulation)
    m      the batch of that forward (None: not known)
    lead   how many leading dims of x may hold the sample (None: the module's rule, worked out when
           the curvature is built)
    seq_first  the sample is dimension 1 ([T, N, E], inside MultiheadAttention)
    jacobian_grad  the block's parameters were detached for this call: its weight gradient comes
           from its Jacobian (``grad_from_jacobian``), formed during the backward
    jac    J / m per parameter ([m, *p.shape]) formed then
    graph_pass  a ``create_graph`` pass that does not accumulate into ``.grad`` (``torch.autograd.grad(
           loss, x, create_graph=True)``: a gradient penalty in the making) reached the output of a
           ``jacobian_grad`` call; its terms through the detached parameters would be lost (build.py)
    made   x was made by an op of the captured forward (it had a grad_fn): an activation no caller
           refills in place, so the curvature may keep it without a copy (build.py)

``sample_first`` (curvature/uses.py) returns a copy with the sample moved to dimension 0.
"""
from __future__ import annotations

from torch import Tensor


class Use:
    __slots__ = ("name", "plan", "parts", "x", "grad", "rows", "fwd", "m", "lead", "seq_first", "jacobian_grad", "jac",
                 "graph_pass", "made")

    def __init__(self, name: str, plan, x: Tensor, fwd: int = 0, m: int | None = None, parts=None,
                 lead: int | None = None, seq_first: bool = False) -> None:
        self.name, self.plan, self.parts, self.x = name, plan, parts, x
        self.fwd, self.m, self.lead, self.seq_first = fwd, m, lead, seq_first
        self.grad: Tensor | None = None
        self.rows: list[Tensor] = []
        self.jacobian_grad = False
        self.jac: list[Tensor] | None = None
        self.graph_pass = False
        self.made = False

    @property
    def received(self) -> bool:
        """Whether any backward reached its output."""
        return self.grad is not None or bool(self.rows)

    def moved(self, x: Tensor, grad: Tensor | None, rows: list[Tensor]) -> "Use":
        """The same use with other tensors (the sample moved to dimension 0); a J formed in the backward
        (on the old layout) is not carried over."""
        out = Use(self.name, self.plan, x, self.fwd, self.m, self.parts, self.lead, False)
        out.grad, out.rows, out.jacobian_grad = grad, rows, self.jacobian_grad     # jac: formed on the old layout, dropped
        out.graph_pass, out.made = self.graph_pass, self.made
        return out
