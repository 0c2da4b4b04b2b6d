"""``Term``: one parameter of a module with the ``LayerSpec`` that makes it linear, plus the
input pre-map (paper, Remark 1) that the torch side applies before unfolding."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tengrad_ir import LayerSpec


@dataclass(frozen=True)
class Term:
    """``param``: the attribute name of the parameter in its module (``"weight"``, ``"bias"``).
    ``pre_map``: ``x -> x'`` applied to the module input before unfolding (None: identity).
    ``pre_map_keeps_shape``: x' has x's shape (a normalisation), so planning a new input shape needs
    no meta-device call of the pre-map.
    """

    param: str
    spec: LayerSpec
    pre_map: Callable[[torch.Tensor], torch.Tensor] | None = None
    pre_map_keeps_shape: bool = False
