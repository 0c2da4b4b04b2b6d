"""Layer test cases as data (BackPACK/einconv style): module factories plus input shapes or makers.

Every case is tiny (batch 2..5, channels <= 6, spatial <= 9) so the full cross product with
dtypes and evaluation orders stays fast on CPU.

``allow_error`` marks configurations the library may legitimately refuse (non-zero padding modes,
a LayerNorm without parameters): for those a test accepts either exact agreement with the oracle or
a ``tengrad.TengradError``, nothing else.

``layer_setup(case_id)`` builds a case's module (random parameter values), data and float64 oracle
Jacobian once per process, for float64 and float32 alike (the same float32-representable numbers).
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .jacobian_oracle import as_oracle_module, batch_stat_view, per_sample_jacobian, trainable_params

__all__ = ["Case", "CASES", "CASE_IDS", "BY_ID", "DTYPES", "LayerSetup", "case_seed", "layer_setup",
           "make_setup_input", "frozen_weight"]


@dataclass(frozen=True)
class Case:
    id: str
    make_module: Callable[[], nn.Module]
    input_shape: Optional[tuple[int, ...]] = None
    make_input: Optional[Callable[[torch.Generator], torch.Tensor]] = None
    allow_error: bool = False
    # (module, x) -> (oracle module, oracle input): for layers whose samples couple (BatchNorm in
    # training mode), the oracle differentiates the affine with x_hat held fixed (jacobian_oracle.batch_stat_view)
    oracle_view: Optional[Callable] = None

    def __post_init__(self):
        if (self.input_shape is None) == (self.make_input is None):
            raise ValueError(f"case {self.id}: give exactly one of input_shape / make_input")


def make_setup_input(case: Case, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """The case's input: seeded standard normal of input_shape, or make_input(gen) (ids stay long)."""
    if case.make_input is not None:
        x = case.make_input(gen)
    else:
        x = torch.randn(case.input_shape, generator=gen, dtype=torch.float64)
    return x.to(dtype) if x.is_floating_point() else x


def frozen_weight(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def f():
        mod = make()
        mod.weight.requires_grad_(False)
        return mod

    return f


def frozen_bias(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def f():
        mod = make()
        mod.bias.requires_grad_(False)
        return mod

    return f


def eval_mode(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """The module in eval mode with random (non-default) running statistics."""

    def f():
        mod = make()
        gen = torch.Generator().manual_seed(11)
        if getattr(mod, "running_mean", None) is not None:
            mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=gen))
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
        return mod.eval()

    return f


def _ids(m: int, t: Optional[int], num: int, must: tuple[int, ...] = ()) -> Callable:
    """Random ids in [0, num) of shape [m] or [m, t], with every id in ``must`` present."""

    def f(gen: torch.Generator) -> torch.Tensor:
        shape = (m,) if t is None else (m, t)
        ids = torch.randint(0, num, shape, generator=gen)
        flat = ids.view(-1)
        for k, v in enumerate(must):
            flat[(3 * k + 1) % flat.numel()] = v
        return ids

    return f


C = Case
CASES: list[Case] = [
    # ---------------------------------------------------------------- Conv1d
    C("conv1d_basic", lambda: nn.Conv1d(3, 4, 3), (3, 3, 8)),
    C("conv1d_nobias", lambda: nn.Conv1d(3, 4, 3, bias=False), (3, 3, 8)),
    C("conv1d_stride2", lambda: nn.Conv1d(2, 3, 3, stride=2), (2, 2, 9)),
    C("conv1d_stride3_pad1", lambda: nn.Conv1d(2, 3, 2, stride=3, padding=1), (4, 2, 9)),
    C("conv1d_dil2", lambda: nn.Conv1d(2, 3, 3, dilation=2), (3, 2, 9)),
    C("conv1d_dil2_stride2_pad2", lambda: nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=2), (3, 2, 9)),
    C("conv1d_pad_tuple", lambda: nn.Conv1d(2, 3, 3, padding=(2,)), (2, 2, 6)),
    C("conv1d_same", lambda: nn.Conv1d(2, 3, 3, padding="same"), (3, 2, 7)),
    C("conv1d_same_evenk", lambda: nn.Conv1d(2, 3, 4, padding="same"), (3, 2, 7)),
    C("conv1d_same_dil2", lambda: nn.Conv1d(2, 3, 3, padding="same", dilation=2), (2, 2, 7)),
    C("conv1d_valid", lambda: nn.Conv1d(2, 3, 3, padding="valid"), (2, 2, 7)),
    C("conv1d_groups2", lambda: nn.Conv1d(4, 6, 3, groups=2), (3, 4, 7)),
    C("conv1d_depthwise", lambda: nn.Conv1d(4, 4, 3, groups=4, padding=1), (3, 4, 7)),
    C("conv1d_chanmult", lambda: nn.Conv1d(3, 6, 3, groups=3), (3, 3, 7)),
    C("conv1d_k1", lambda: nn.Conv1d(3, 2, 1), (2, 3, 5)),
    C("conv1d_frozen_w", frozen_weight(lambda: nn.Conv1d(2, 3, 3)), (3, 2, 6)),
    C("conv1d_frozen_b", frozen_bias(lambda: nn.Conv1d(2, 3, 3)), (3, 2, 6)),
    C("conv1d_reflect", lambda: nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect"), (3, 2, 7), allow_error=True),
    C("conv1d_replicate", lambda: nn.Conv1d(2, 3, 3, padding=2, padding_mode="replicate"), (3, 2, 7), allow_error=True),
    C("conv1d_circular", lambda: nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), (3, 2, 7), allow_error=True),
    # ---------------------------------------------------------------- Conv2d
    C("conv2d_basic", lambda: nn.Conv2d(3, 4, 3), (3, 3, 6, 6)),
    C("conv2d_nobias", lambda: nn.Conv2d(3, 4, 3, bias=False), (2, 3, 5, 6)),
    C("conv2d_stride2_pad1", lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (3, 2, 7, 7)),
    C("conv2d_stride_tuple_3_1", lambda: nn.Conv2d(2, 3, 3, stride=(3, 1)), (2, 2, 9, 5)),
    C("conv2d_dil2", lambda: nn.Conv2d(2, 3, 3, dilation=2), (2, 2, 7, 6)),
    C("conv2d_dil_tuple_pad_tuple", lambda: nn.Conv2d(2, 3, (3, 2), dilation=(1, 2), padding=(1, 2)), (3, 2, 5, 6)),
    C("conv2d_kernel_3x2", lambda: nn.Conv2d(2, 3, (3, 2)), (3, 2, 6, 5)),
    C("conv2d_kernel_1x3_stride_2x3", lambda: nn.Conv2d(2, 2, (1, 3), stride=(2, 3), padding=(0, 1)), (2, 2, 6, 8)),
    C("conv2d_pad2", lambda: nn.Conv2d(2, 3, 3, padding=2), (2, 2, 4, 5)),
    C("conv2d_same", lambda: nn.Conv2d(2, 3, 3, padding="same"), (3, 2, 5, 5)),
    C("conv2d_same_k3x2_dil2", lambda: nn.Conv2d(2, 3, (3, 2), padding="same", dilation=2), (2, 2, 6, 6)),
    C("conv2d_valid", lambda: nn.Conv2d(2, 3, 2, padding="valid"), (2, 2, 5, 4)),
    C("conv2d_groups2", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (3, 4, 5, 5)),
    C("conv2d_groups2_nobias", lambda: nn.Conv2d(4, 2, 2, groups=2, bias=False), (2, 4, 5, 4)),
    C("conv2d_depthwise", lambda: nn.Conv2d(3, 3, 3, groups=3, padding=1), (3, 3, 5, 5)),
    C("conv2d_depthwise_stride2", lambda: nn.Conv2d(4, 4, 3, groups=4, stride=2), (2, 4, 7, 7)),
    C("conv2d_chanmult", lambda: nn.Conv2d(3, 6, 3, groups=3), (3, 3, 5, 5)),
    C("conv2d_chanmult_nobias", lambda: nn.Conv2d(2, 4, (2, 3), groups=2, bias=False), (2, 2, 5, 5)),
    C("conv2d_frozen_w", frozen_weight(lambda: nn.Conv2d(2, 3, 3)), (3, 2, 5, 5)),
    C("conv2d_frozen_w_groups2", frozen_weight(lambda: nn.Conv2d(4, 4, 2, groups=2)), (2, 4, 4, 4)),
    C("conv2d_frozen_b", frozen_bias(lambda: nn.Conv2d(2, 3, 3)), (3, 2, 5, 5)),
    C("conv2d_batch5", lambda: nn.Conv2d(2, 2, 3, padding=1), (5, 2, 4, 4)),
    C("conv2d_out_1x1", lambda: nn.Conv2d(2, 3, 4), (3, 2, 4, 4)),
    C("conv2d_reflect", lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (3, 2, 5, 5), allow_error=True),
    C("conv2d_replicate", lambda: nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="replicate"), (3, 2, 5, 5), allow_error=True),
    C("conv2d_circular", lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", stride=2), (3, 2, 5, 6), allow_error=True),
    C("conv2d_reflect_same", lambda: nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"), (2, 2, 5, 5), allow_error=True),
    # ---------------------------------------------------------------- Conv3d
    C("conv3d_basic", lambda: nn.Conv3d(2, 3, 2), (2, 2, 4, 4, 3)),
    C("conv3d_nobias", lambda: nn.Conv3d(2, 3, 2, bias=False), (2, 2, 3, 4, 3)),
    C("conv3d_stride2_pad1", lambda: nn.Conv3d(2, 2, 3, stride=2, padding=1), (3, 2, 5, 4, 5)),
    C("conv3d_kernel_2x3x1_dil", lambda: nn.Conv3d(2, 2, (2, 3, 1), dilation=(2, 1, 1), padding=(0, 1, 0)), (2, 2, 5, 4, 3)),
    C("conv3d_same", lambda: nn.Conv3d(2, 2, 3, padding="same"), (2, 2, 4, 3, 4)),
    C("conv3d_valid_stride3", lambda: nn.Conv3d(2, 2, 2, padding="valid", stride=3), (2, 2, 5, 5, 5)),
    C("conv3d_groups2", lambda: nn.Conv3d(4, 2, 2, groups=2), (2, 4, 3, 3, 3)),
    C("conv3d_depthwise", lambda: nn.Conv3d(3, 3, 2, groups=3, padding=1), (2, 3, 3, 3, 3)),
    C("conv3d_chanmult", lambda: nn.Conv3d(2, 4, 2, groups=2), (2, 2, 3, 3, 3)),
    C("conv3d_frozen_w", frozen_weight(lambda: nn.Conv3d(2, 2, 2)), (2, 2, 3, 3, 3)),
    C("conv3d_replicate", lambda: nn.Conv3d(2, 2, 3, padding=1, padding_mode="replicate"), (2, 2, 3, 4, 3), allow_error=True),
    C("conv3d_circular", lambda: nn.Conv3d(2, 2, 2, padding=1, padding_mode="circular"), (2, 2, 3, 3, 3), allow_error=True),
    # ---------------------------------------------------------------- ConvTranspose1d/2d/3d
    C("convt1d_basic", lambda: nn.ConvTranspose1d(3, 4, 3), (3, 3, 5)),
    C("convt1d_nobias", lambda: nn.ConvTranspose1d(3, 2, 3, bias=False), (2, 3, 5)),
    C("convt1d_stride2_pad1_outpad1", lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1), (3, 2, 5)),
    C("convt1d_stride3_dil2_pad2", lambda: nn.ConvTranspose1d(2, 3, 3, stride=3, dilation=2, padding=2), (3, 2, 4)),
    C("convt1d_outpad_dil", lambda: nn.ConvTranspose1d(2, 2, 2, stride=2, dilation=3, output_padding=2), (2, 2, 4)),
    C("convt1d_groups2", lambda: nn.ConvTranspose1d(4, 6, 3, groups=2, stride=2), (3, 4, 4)),
    C("convt1d_depthwise", lambda: nn.ConvTranspose1d(4, 4, 3, groups=4, padding=1), (3, 4, 5)),
    C("convt1d_frozen_w", frozen_weight(lambda: nn.ConvTranspose1d(2, 3, 3)), (3, 2, 4)),
    C("convt2d_basic", lambda: nn.ConvTranspose2d(3, 4, 3), (3, 3, 4, 4)),
    C("convt2d_nobias", lambda: nn.ConvTranspose2d(2, 3, (3, 2), bias=False), (2, 2, 4, 3)),
    C("convt2d_stride2_pad1_outpad1", lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), (3, 2, 3, 4)),
    C("convt2d_stride_tuple_dil_pad", lambda: nn.ConvTranspose2d(2, 2, (2, 3), stride=(3, 1), dilation=(1, 2), padding=(1, 2)), (2, 2, 3, 4)),
    C("convt2d_groups2", lambda: nn.ConvTranspose2d(4, 2, 2, groups=2, stride=2), (2, 4, 3, 3)),
    C("convt2d_depthwise", lambda: nn.ConvTranspose2d(3, 3, 3, groups=3, stride=2, padding=1), (3, 3, 3, 3)),
    C("convt2d_chanmult", lambda: nn.ConvTranspose2d(2, 4, 2, groups=2), (2, 2, 3, 3)),
    C("convt2d_frozen_w", frozen_weight(lambda: nn.ConvTranspose2d(2, 3, 3, stride=2)), (3, 2, 3, 3)),
    C("convt2d_frozen_b", frozen_bias(lambda: nn.ConvTranspose2d(2, 3, 2)), (3, 2, 3, 3)),
    C("convt3d_basic", lambda: nn.ConvTranspose3d(2, 3, 2), (2, 2, 3, 2, 3)),
    C("convt3d_stride2_pad1_outpad", lambda: nn.ConvTranspose3d(2, 2, 3, stride=2, padding=1, output_padding=(1, 0, 1)), (2, 2, 2, 3, 2)),
    C("convt3d_groups2_dil_nobias", lambda: nn.ConvTranspose3d(4, 2, 2, groups=2, dilation=(2, 1, 1), bias=False), (2, 4, 2, 2, 3)),
    C("convt3d_depthwise", lambda: nn.ConvTranspose3d(2, 2, 2, groups=2, stride=(1, 2, 1)), (3, 2, 2, 2, 2)),
    # ---------------------------------------------------------------- Linear
    C("linear_2d", lambda: nn.Linear(5, 4), (4, 5)),
    C("linear_2d_nobias", lambda: nn.Linear(5, 4, bias=False), (3, 5)),
    C("linear_2d_out1", lambda: nn.Linear(4, 1), (5, 4)),
    C("linear_2d_in1", lambda: nn.Linear(1, 3), (3, 1)),
    C("linear_3d", lambda: nn.Linear(4, 3), (3, 5, 4)),
    C("linear_3d_nobias", lambda: nn.Linear(4, 3, bias=False), (2, 6, 4)),
    C("linear_3d_t1", lambda: nn.Linear(4, 3), (3, 1, 4)),
    C("linear_4d", lambda: nn.Linear(3, 2), (2, 3, 4, 3)),
    C("linear_4d_nobias", lambda: nn.Linear(3, 4, bias=False), (3, 2, 3, 3)),
    C("linear_frozen_w", frozen_weight(lambda: nn.Linear(4, 3)), (3, 4)),
    C("linear_3d_frozen_w", frozen_weight(lambda: nn.Linear(4, 3)), (3, 2, 4)),
    C("linear_frozen_b", frozen_bias(lambda: nn.Linear(4, 3)), (3, 2, 4)),
    C("linear_batch2_wide", lambda: nn.Linear(6, 6), (2, 6)),
    # ---------------------------------------------------------------- LayerNorm
    C("layernorm_1dim_2d", lambda: nn.LayerNorm(5), (3, 5)),
    C("layernorm_1dim_3d", lambda: nn.LayerNorm(4), (3, 5, 4)),
    C("layernorm_1dim_4d", lambda: nn.LayerNorm(3), (2, 2, 3, 3)),
    C("layernorm_2dim", lambda: nn.LayerNorm((3, 4)), (3, 3, 4)),
    C("layernorm_2dim_4d", lambda: nn.LayerNorm((2, 3)), (2, 4, 2, 3)),
    C("layernorm_1dim_nobias", lambda: nn.LayerNorm(4, bias=False), (3, 5, 4)),
    C("layernorm_2dim_nobias", lambda: nn.LayerNorm((3, 4), bias=False), (2, 3, 4)),
    C("layernorm_eps", lambda: nn.LayerNorm(4, eps=1e-2), (3, 4)),
    C("layernorm_frozen_w", frozen_weight(lambda: nn.LayerNorm(4)), (3, 2, 4)),
    C("layernorm_no_affine", lambda: nn.LayerNorm(4, elementwise_affine=False), (3, 4), allow_error=True),
    # ---------------------------------------------------------------- Embedding
    C("embedding_1d_ids", lambda: nn.Embedding(5, 3), make_input=_ids(4, None, 5)),
    C("embedding_2d_ids", lambda: nn.Embedding(6, 4), make_input=_ids(3, 5, 6)),
    C("embedding_dup_ids", lambda: nn.Embedding(3, 2), make_input=_ids(3, 6, 3)),
    C("embedding_padding_idx", lambda: nn.Embedding(6, 3, padding_idx=0), make_input=_ids(3, 5, 6, must=(0, 0))),
    C("embedding_padding_idx_mid", lambda: nn.Embedding(5, 3, padding_idx=2), make_input=_ids(4, 4, 5, must=(2,))),
    C("embedding_padding_idx_neg", lambda: nn.Embedding(5, 3, padding_idx=-1), make_input=_ids(3, 4, 5, must=(4, 4))),
    C("embedding_padding_idx_1d", lambda: nn.Embedding(4, 2, padding_idx=1), make_input=_ids(5, None, 4, must=(1,))),
    C("embedding_frozen", frozen_weight(lambda: nn.Embedding(4, 2)), make_input=_ids(3, 2, 4), allow_error=True),
    # ---------------------------------------------------------------- BatchNorm (training: x_hat fixed)
    C("batchnorm1d_train_2d", lambda: nn.BatchNorm1d(3), (4, 3), oracle_view=batch_stat_view),
    C("batchnorm1d_train_3d", lambda: nn.BatchNorm1d(3), (3, 3, 5), oracle_view=batch_stat_view),
    C("batchnorm2d_train", lambda: nn.BatchNorm2d(3), (3, 3, 4, 4), oracle_view=batch_stat_view),
    C("batchnorm3d_train", lambda: nn.BatchNorm3d(2), (3, 2, 3, 3, 2), oracle_view=batch_stat_view),
    C("batchnorm2d_train_eps_mom_none", lambda: nn.BatchNorm2d(3, eps=0.1, momentum=None), (2, 3, 3, 3),
      oracle_view=batch_stat_view),
    C("batchnorm2d_untracked_train", lambda: nn.BatchNorm2d(3, track_running_stats=False), (3, 3, 3, 4),
      oracle_view=batch_stat_view),
    C("batchnorm2d_untracked_eval", eval_mode(lambda: nn.BatchNorm2d(3, track_running_stats=False)),
      (3, 3, 3, 4), oracle_view=batch_stat_view),
    C("batchnorm2d_train_frozen_w", frozen_weight(lambda: nn.BatchNorm2d(3)), (3, 3, 3, 3), oracle_view=batch_stat_view),
    C("batchnorm1d_train_frozen_b", frozen_bias(lambda: nn.BatchNorm1d(4)), (5, 4), oracle_view=batch_stat_view),
    C("batchnorm1d_eval_2d", eval_mode(lambda: nn.BatchNorm1d(3)), (4, 3)),
    C("batchnorm1d_eval_3d", eval_mode(lambda: nn.BatchNorm1d(3)), (3, 3, 4)),
    C("batchnorm2d_eval", eval_mode(lambda: nn.BatchNorm2d(3)), (3, 3, 4, 4)),
    C("batchnorm3d_eval", eval_mode(lambda: nn.BatchNorm3d(2, eps=1e-3)), (2, 2, 3, 2, 3)),
    C("batchnorm2d_eval_frozen_b", eval_mode(frozen_bias(lambda: nn.BatchNorm2d(3))), (3, 3, 3, 3)),
    C("batchnorm2d_no_affine", lambda: nn.BatchNorm2d(3, affine=False), (3, 3, 3, 3), allow_error=True),
    # ---------------------------------------------------------------- GroupNorm
    C("groupnorm_1d", lambda: nn.GroupNorm(3, 6), (3, 6, 5)),
    C("groupnorm_2d", lambda: nn.GroupNorm(2, 4), (3, 4, 3, 4)),
    C("groupnorm_3d", lambda: nn.GroupNorm(2, 4, eps=1e-2), (2, 4, 2, 3, 2)),
    C("groupnorm_flat", lambda: nn.GroupNorm(2, 4), (4, 4)),
    C("groupnorm_one_group", lambda: nn.GroupNorm(1, 3), (3, 3, 4, 4)),
    C("groupnorm_per_channel", lambda: nn.GroupNorm(3, 3), (3, 3, 4, 4)),
    C("groupnorm_frozen_w", frozen_weight(lambda: nn.GroupNorm(2, 4)), (3, 4, 5)),
    C("groupnorm_no_affine", lambda: nn.GroupNorm(2, 4, affine=False), (3, 4, 5), allow_error=True),
    # ---------------------------------------------------------------- InstanceNorm
    C("instancenorm1d_affine", lambda: nn.InstanceNorm1d(3, affine=True), (3, 3, 6)),
    C("instancenorm2d_affine", lambda: nn.InstanceNorm2d(3, affine=True), (3, 3, 4, 4)),
    C("instancenorm3d_affine", lambda: nn.InstanceNorm3d(2, affine=True, eps=1e-2), (2, 2, 3, 2, 3)),
    C("instancenorm2d_tracked_eval", eval_mode(lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True)),
      (3, 3, 4, 3)),
    C("instancenorm1d_frozen_b", frozen_bias(lambda: nn.InstanceNorm1d(4, affine=True)), (3, 4, 5)),
    C("instancenorm2d_no_affine", lambda: nn.InstanceNorm2d(3), (3, 3, 4, 4), allow_error=True),
    # ---------------------------------------------------------------- RMSNorm
    C("rmsnorm_1dim_2d", lambda: nn.RMSNorm(5), (3, 5)),
    C("rmsnorm_1dim_3d", lambda: nn.RMSNorm(4, eps=1e-3), (3, 5, 4)),
    C("rmsnorm_2dim_4d", lambda: nn.RMSNorm((2, 3)), (2, 4, 2, 3)),
    C("rmsnorm_eps", lambda: nn.RMSNorm(4, eps=0.1), (4, 2, 4)),
    C("rmsnorm_no_affine", lambda: nn.RMSNorm(4, elementwise_affine=False), (3, 4), allow_error=True),
]
del C

CASE_IDS = [c.id for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS), "duplicate case ids"


# --------------------------------------------------------------------------- cached setups
@dataclass(frozen=True)
class LayerSetup:
    """One case's module, data and float64 oracle, in both dtypes (``DTYPES`` names them).

    Every floating value (parameters, x, gy, p, u) is drawn in float64 and rounded to float32 once, so
    the float64 and float32 setups hold the same numbers and one float64 oracle J serves both: J is the
    exact truth for the float32 inputs as well. Integer ids are shared as they are.
    """
    case: Case
    module: dict            # {dtype: module}; the float64 one's parameters have random, non-default values
    x: dict                 # {dtype: module input}
    gy: dict                # {dtype: output gradient}
    p: dict                 # {dtype: [tangent per trainable parameter]}
    u: dict                 # {dtype: [m] weights for J^T u}
    oracle_module: nn.Module  # what J differentiates (float64): the module, or its affine for coupled samples
    oracle_x: torch.Tensor    # that module's input (x, or x_hat held fixed)
    J: torch.Tensor           # float64 oracle [m, P] (jacobian_oracle.per_sample_jacobian)


DTYPES = {"f64": torch.float64, "f32": torch.float32}
BY_ID = {c.id: c for c in CASES}


def case_seed(case_id: str) -> int:
    return zlib.crc32(case_id.encode())


def _f32_exact(t: torch.Tensor) -> torch.Tensor:
    """A float64 tensor of values that float32 holds exactly."""
    return t.to(torch.float32).to(torch.float64) if t.is_floating_point() else t


@functools.lru_cache(maxsize=None)
def layer_setup(case_id: str) -> LayerSetup:
    """The case's setup, built once per process (the float64 oracle J is the expensive part)."""
    case = BY_ID[case_id]
    torch.manual_seed(case_seed(case_id))
    mod64 = case.make_module().double()
    gen = torch.Generator().manual_seed(case_seed(case_id) + 7)
    with torch.no_grad():  # random (non-default) parameter values: LayerNorm starts at 1 / 0
        for prm in mod64.parameters():
            prm.copy_(_f32_exact(torch.randn(prm.shape, generator=gen, dtype=prm.dtype)))
        for buf in mod64.buffers():   # running statistics: already float32 values, kept exact
            if buf.is_floating_point():
                buf.copy_(_f32_exact(buf))
    mod32 = as_oracle_module(mod64, torch.float32)
    gen = torch.Generator().manual_seed(case_seed(case_id) + 1)
    x = _f32_exact(make_setup_input(case, gen, torch.float64))
    with torch.no_grad():
        y = mod64(x)
    gy = _f32_exact(torch.randn(y.shape, generator=gen, dtype=torch.float64))
    p = [_f32_exact(torch.randn(t.shape, generator=gen, dtype=torch.float64)) for _, t in trainable_params(mod64)]
    u = _f32_exact(torch.randn(x.shape[0], generator=gen, dtype=torch.float64))
    if case.oracle_view is not None:   # samples coupled by batch statistics: x_hat held fixed
        oracle_module, oracle_x = case.oracle_view(mod64, x)
    else:
        oracle_module, oracle_x = mod64, x
    J = per_sample_jacobian(oracle_module, oracle_x, gy)

    def cast(t, dtype):
        return t.to(dtype) if t.is_floating_point() else t

    dt = DTYPES.values()
    return LayerSetup(case, {torch.float64: mod64, torch.float32: mod32}, {d: cast(x, d) for d in dt},
                      {d: gy.to(d) for d in dt}, {d: [t.to(d) for t in p] for d in dt}, {d: u.to(d) for d in dt},
                      oracle_module, oracle_x, J)
