"""tengrad: TENGraD natural gradient with exact per-layer Woodbury solves, compiled from
index-notation layer specs. The maths are in the paper, in the module docstrings and in
docs/architecture.md; the public names are fixed in docs/api-contract.md."""
from tengrad_ir import LayerSpec

from .compiler import CompiledLayer
from .compiler import ModulePlan
from .errors import ShapeError, SpecError, TengradError, UnsupportedLayerError
from .layers import Term, register_layer, registered_layers
from .optim import TENGraD, TENGraDError
from .layers import register_op, registered_ops


def compile(module, backend: str = "torch", **options) -> CompiledLayer:  # noqa: A001 (the public name)
    """Compile ``module``'s spec into a plan with ``gram``, ``jvp``, ``vjp`` and ``jacobian``.

    ``backend``: ``"torch"`` (reference, any device), ``"triton"`` (generated kernels, CUDA) or
    ``"auto"``. ``memory_cap`` (bytes) bounds the extra memory of the chosen orders.
    """
    return CompiledLayer(module, backend=backend, **options)


__all__ = ["compile", "TENGraD", "CompiledLayer", "ModulePlan", "LayerSpec", "Term", "register_layer", "registered_layers", "register_op", "registered_ops",
           "TengradError", "SpecError", "ShapeError", "UnsupportedLayerError", "TENGraDError"]
