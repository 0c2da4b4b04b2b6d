"""The torch backend: the reference execution of every step, on any device.

``TermRun`` holds one term bound to tensors: ``X`` with one dimension per ``kind.x_indices`` (after
the pre-map; integer ids for a one-hot term, None for a ones term) and ``G`` with one dimension per
output index. Each step kind has one handler (see ``tengrad_ir.steps`` for the maths):

    Contract        named-index einsum (``contract``: torch.einsum pairwise, opt_einsum's path
                    beyond); two operands of one layout summed down to a suffix of it stream as a
                    product and a sum over the leading dims (the factored_raw layout)
    Unfold          strided view of the windowed input (``unfold``), no im2col copy
    ConvForward     torch's convolution with weights p; ConvWeightGrad its weight gradient (per
                    sample: im2col + bmm for an ungrouped conv, else the batch folded into the groups;
                    ``conv_kernels.per_sample_kernel``, printed with the plan's sizes)
    RawCovUnfold    windowed R read through the maps as a strided view, summed over kernel positions
    UnfoldOutput    strided view of G windowed along the output maps (zero outside the output)
    ConvTranspose*  torch's transposed convolution with weights p, and its weight gradient summed
                    over samples (a convolution weight gradient with the windowed G as input)
    SymmetricGram   ``symmetric_gram`` (blocks on and above the diagonal)
    OneHot*         gathers, index_add scatters and an equality mask on the ids
"""
from __future__ import annotations

import itertools
import math

import torch

from tengrad_ir import LayerSpec, Step, conv_geometry, kind_of
from tengrad_ir.geometry import transposed_geometry
from tengrad_ir import steps as S

from ..errors import TengradError
from .backend import StepRun
from . import conv_kernels
from .conv_kernels import ConvLayout
from .conv_transpose_kernels import ConvTransposeLayout
from .einsum import Add, contract
from .unfold import strided_unfold, window


def symmetric_gram(j: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``j @ j.T`` for j: [m, p], computing only the blocks on and above the diagonal.

    With b = ceil(m / block) row blocks this costs (b + 1) / (2 b) of the full product (5/8 at
    b = 4); the blocks below the diagonal are copied transposes.
    """
    m = j.shape[0]
    if m < 2 * block:
        return j @ j.T
    out = j.new_empty(m, m)
    edges = list(range(0, m, block)) + [m]
    for a0, a1 in zip(edges, edges[1:]):
        rows = j[a0:a1]
        blk = rows @ j[a0:].T
        out[a0:a1, a0:] = blk
        out[a1:, a0:a1] = blk[:, a1 - a0:].T
    return out


def _operand(env: dict, t) -> tuple[torch.Tensor, tuple[str, ...]]:
    return env[S.base(t.name)], t.indices


def _contract(run: "TermRun", step: S.Contract, env: dict, add: Add | None = None) -> torch.Tensor:
    """The step's einsum; ``add``: + beta * c (c reshaped to the result), in the product itself when it
    is one matrix product (``einsum.contract``)."""
    ops = [_operand(env, t) for t in step.inputs]
    out = step.out.indices
    if add is not None:
        add = add.reshaped([run.sizes[i] for i in out])
    if len(ops) == 2 and ops[0][1] == ops[1][1] and ops[0][1][len(ops[0][1]) - len(out):] == out:
        a, b = ops[0][0], ops[1][0]
        res = (a * b).reshape(-1, *a.shape[a.dim() - len(out):]).sum(0)
        return res if add is None else add.after(res)
    return contract(out, *ops, add=add)


_contract.adds = True


def _unfold(run: "TermRun", step: S.Unfold, env: dict) -> torch.Tensor:
    return strided_unfold(run.xw, run.x_idx, step.out.indices, run.spec, run.sizes)


def _conv_forward(run: "TermRun", step: S.ConvForward, env: dict) -> torch.Tensor:
    c = run.conv
    y = c.forward(c.x(run.xw, run.x_idx), c.w(env["p"]))
    return y.reshape([run.sizes[i] for i in step.out.indices])


def _conv_weight_grad(run: "TermRun", step: S.ConvWeightGrad, env: dict) -> torch.Tensor:
    c = run.conv
    gin = step.inputs[1]
    gc = c.y(env[gin.name], gin.indices)
    if gin.indices[0] in step.out.indices and c.kernel == conv_kernels.IM2COL:   # per sample: J
        return c.w_back(c.per_sample_im2col_bmm(run.x_chunk, gc), batch=True)
    xc = c.x(run.xw, run.x_idx)
    if gin.indices[0] in step.out.indices:
        return c.w_back(c.per_sample_weight_grad(xc, gc), batch=True)
    return c.w_back(c.weight_grad(xc, gc))


def _unfold_output(run: "TermRun", step: S.UnfoldOutput, env: dict) -> torch.Tensor:
    g_t = step.inputs[0]
    s = run.spec
    gw = window(env[g_t.name], g_t.indices, s, run.sizes, maps=s.out_maps)
    return strided_unfold(gw, g_t.indices, step.out.indices, s, run.sizes, maps=s.out_maps)


def _conv_transpose_forward(run: "TermRun", step: S.ConvTransposeForward, env: dict) -> torch.Tensor:
    c = run.convt
    return c.forward(c.x(run.x, run.x_idx), c.w(env["p"]), step.out.indices)


def _conv_transpose_weight_grad(run: "TermRun", step: S.ConvTransposeWeightGrad, env: dict) -> torch.Tensor:
    c = run.convt
    xin, gin = step.inputs   # X (or Xu = u X) and G (or Gu = u G)
    return c.w_back(c.weight_grad(c.x(env[xin.name], xin.indices), c.gw(env[gin.name], gin.indices)))


def _raw_cov_unfold(run: "TermRun", step: S.RawCovUnfold, env: dict) -> torch.Tensor:
    """C1 (or C2, output maps) = sum_K R[map(C,K), map(C',K)]: R windowed along P and P', then one strided view per
    kernel position, each a run of contiguous m x m blocks (R is laid out with the pair last)."""
    s, sizes = run.spec, run.sizes
    r_t = step.inputs[0]
    r_idx = r_t.indices
    maps = s.out_maps or s.maps   # output maps: R is the raw output gradient's covariance
    rw = window(window(env[r_t.name], r_idx, s, sizes, maps=maps), r_idx, s, sizes, primed=True, maps=maps)
    view = strided_unfold(rw, r_idx, step.out.indices + step.kernels, s, sizes, pairs=(("", ""), ("'", "'")),
                          maps=maps)
    c1 = torch.zeros(view.shape[:len(step.out.indices)], dtype=view.dtype, device=view.device)
    for k in itertools.product(*(range(sizes[i]) for i in step.kernels)):
        c1 += view[(Ellipsis,) + k]
    return c1


def _symmetric_gram(run: "TermRun", step: S.SymmetricGram, env: dict) -> torch.Tensor:
    return symmetric_gram(env[step.inputs[0].name].reshape(run.m, -1))


def _one_hot_equal(run: "TermRun", step: S.OneHotEqual, env: dict) -> torch.Tensor:
    """C1[n, n', t, t'] = [ids[n,t] == ids[n',t']], zero where an id is masked out (negative)."""
    ids = run.x.reshape(run.m, -1)
    valid = ids >= 0
    eq = (ids[:, None, :, None] == ids[None, :, None, :]) & valid[:, None, :, None] & valid[None, :, None, :]
    a, b = step.inputs
    have = (a.indices[0], b.indices[0]) + a.indices[1:] + b.indices[1:]
    eq = eq.to(run.g.dtype).reshape([run.sizes[S.base(i)] if i.endswith("'") else run.sizes[i] for i in have])
    return contract(step.out.indices, (eq, have))


def _rows(run: "TermRun", t: torch.Tensor, idx: tuple[str, ...]) -> tuple[torch.Tensor, tuple[str, ...]]:
    """A G-like tensor as [m, T, R]: T the ids' non-batch indices, R the rest (in order)."""
    rest = tuple(i for i in idx if i not in run.x_idx)
    rows = contract(run.x_idx + rest, (t, idx))
    return rows.reshape(run.m, -1, math.prod(run.sizes[i] for i in rest)), rest


def _one_hot_gather(run: "TermRun", step: S.OneHotGather, env: dict) -> torch.Tensor:
    """Y[n, t, rest] = p[ids[n, t], rest] (zero for a masked id)."""
    p_idx = run.spec.param_indices
    rest = tuple(i for i in p_idx if i != step.hot)
    table = contract((step.hot,) + rest, (env["p"], p_idx)).reshape(run.sizes[step.hot], -1)
    ids = run.x.reshape(run.m, -1)
    y = table[ids.clamp_min(0)] * (ids >= 0)[..., None]
    have = run.x_idx + rest
    return contract(step.out.indices, (y.reshape([run.sizes[i] for i in have]), have))


def _one_hot_scatter(run: "TermRun", step: S.OneHotScatter, env: dict) -> torch.Tensor:
    """Rows of G (or Gu) added at their ids: per sample (J) or summed over samples (J^T u)."""
    gin = step.inputs[1]
    rows, rest = _rows(run, env[gin.name], gin.indices)
    ids = run.x.reshape(run.m, -1)
    valid = ids >= 0
    vocab = run.sizes[step.hot]
    n = run.spec.batch
    if n in step.out.indices:
        flat = (torch.arange(run.m, device=ids.device)[:, None] * vocab + ids.clamp_min(0))[valid]
        out = rows.new_zeros(run.m * vocab, rows.shape[-1]).index_add_(0, flat, rows[valid])
        have = (n, step.hot) + rest
    else:
        out = rows.new_zeros(vocab, rows.shape[-1]).index_add_(0, ids[valid], rows[valid])
        have = (step.hot,) + rest
    return contract(step.out.indices, (out.reshape([run.sizes[i] for i in have]), have))


HANDLERS = {S.Contract: _contract, S.Unfold: _unfold, S.ConvForward: _conv_forward,
            S.ConvWeightGrad: _conv_weight_grad, S.RawCovUnfold: _raw_cov_unfold,
            S.SymmetricGram: _symmetric_gram, S.OneHotEqual: _one_hot_equal,
            S.OneHotGather: _one_hot_gather, S.OneHotScatter: _one_hot_scatter,
            S.UnfoldOutput: _unfold_output, S.ConvTransposeForward: _conv_transpose_forward,
            S.ConvTransposeWeightGrad: _conv_transpose_weight_grad}

_WHAT = {S.Contract: "torch.einsum (opt_einsum path beyond two operands)", S.Unfold: "as_strided view",
         S.ConvForward: "F.conv1d/2d/3d", S.ConvWeightGrad: "torch.nn.grad.conv1d/2d/3d_weight",
         S.RawCovUnfold: "strided views of R, summed", S.SymmetricGram: "symmetric_gram (upper blocks)",
         S.OneHotEqual: "equality mask", S.OneHotGather: "index gather", S.OneHotScatter: "index_add_",
         S.UnfoldOutput: "as_strided view of the windowed G",
         S.ConvTransposeForward: "F.conv_transpose1d/2d/3d (full extent, placed at the map offset)",
         S.ConvTransposeWeightGrad: "torch.nn.grad.conv1d/2d/3d_weight (input: windowed G, output grad: X)"}


class TermRun(StepRun):
    """One term bound to tensors, run by the handlers above."""

    def __init__(self, spec: LayerSpec, sizes: dict[str, int], x: torch.Tensor | None, g: torch.Tensor):
        super().__init__(spec, sizes, x, g)
        self.x_idx = kind_of(spec).x_indices(spec)
        geo = conv_geometry(spec)
        self.conv = ConvLayout(spec, geo, sizes) if geo is not None else None
        tgeo = transposed_geometry(spec)
        self.convt = ConvTransposeLayout(spec, tgeo, sizes) if tgeo is not None else None
        self._xw = None

    @property
    def xw(self) -> torch.Tensor:
        """X windowed along every mapped index to its map's extent (computed once per binding)."""
        if self._xw is None:
            self._xw = window(self.x, self.x_idx, self.spec, self.sizes)
        return self._xw

    def x_chunk(self, a: int, b: int) -> torch.Tensor:
        """Samples a..b-1 of the windowed X in conv layout: a slice of ``xw`` once that exists, else
        the chunk windowed alone (small buffers the allocator reuses, no full padded copy)."""
        c = self.conv
        if self._xw is not None:
            return c.x(self._xw, self.x_idx)[a:b]
        dim = self.x_idx.index(self.spec.batch)
        return c.x(window(self.x.narrow(dim, a, b - a), self.x_idx, self.spec, self.sizes), self.x_idx)

    def handler(self, step: Step):
        try:
            return HANDLERS[type(step)]
        except KeyError:
            raise TengradError(f"{self.spec.name}: the torch backend has no handler for step {step.op!r}") from None

    def unfolded(self) -> torch.Tensor:
        """U as a strided view with one dim per ``spec.unfolded_indices``."""
        return strided_unfold(self.xw, self.x_idx, self.spec.unfolded_indices, self.spec, self.sizes)


class TorchBackend:
    name = "torch"

    def supports(self, step: Step) -> bool:
        return type(step) in HANDLERS

    def describe(self, step: Step, classes: dict[str, int] | None = None) -> str:
        """What runs ``step``; ``classes`` (class sizes such as ``N_g``) resolves a size-dependent kernel."""
        if isinstance(step, S.ConvWeightGrad) and step.inputs[1].indices[0] in step.out.indices:
            text, rule = conv_kernels.KERNEL_TEXT, conv_kernels.per_sample_kernel   # looked up per call
            if classes is None:
                return (f"per sample: {text[rule(1)]} if N_g = 1 (and 1 thread or a small batch), "
                        f"else {text[rule(2)]}")
            threads = torch.get_num_threads()
            unfolded = classes["m"] * classes["N_g"] * classes["N_I"] * classes["N_C"]
            return (f"per sample (N_g = {classes['N_g']}, {threads} thread{'s' if threads > 1 else ''}): "
                    f"{text[rule(classes['N_g'], unfolded, threads)]}")
        return _WHAT[type(step)]

    def bind(self, spec, sizes, x, g) -> TermRun:
        return TermRun(spec, sizes, x, g)


TORCH = TorchBackend()
