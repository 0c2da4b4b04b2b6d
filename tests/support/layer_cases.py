"""Layer test cases as data (BackPACK/einconv style): module factories plus input shapes or makers.

Every case is tiny (batch 2..5, channels <= 6, spatial <= 9) so the full cross product with
dtypes and evaluation orders stays fast on CPU.

``allow_error`` marks configurations the library may legitimately refuse (non-zero padding modes,
a LayerNorm without parameters): for those a test accepts either exact agreement with the oracle or
a ``tengrad.TengradError``, nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .jacobian_oracle import batch_stat_view

__all__ = ["Case", "CASES", "CASE_IDS", "make_setup_input", "frozen_weight"]


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
