"""tengrad_ir: the layer IR of tengrad, pure Python (sympy, opt_einsum); never imports torch or triton.

A layer is a ``LayerSpec`` in index notation; ``derive`` gives its einsums (Jacobian, covariances,
Gram, J p, J^T u), ``enumerate_orders`` their evaluation orders with closed-form costs and
``SizedPlan`` the choice for concrete sizes.
"""
from .derive import Derivation, derive
from .einsum import Einsum, Tensor
from .errors import SpecError, TengradError
from .index_map import IndexMap
from .notation import format_axes, parse_axes, parse_equation
from .orders import ConvGeometry, Order, conv_geometry, enumerate_orders, raw_factorable
from .plan import DEFAULT_MEMORY_CAP, Cost, SizedPlan, class_sizes
from .spec import ROLES, LayerSpec

__all__ = ["LayerSpec", "IndexMap", "Einsum", "Tensor", "Derivation", "derive", "Order", "ConvGeometry",
           "conv_geometry", "raw_factorable", "enumerate_orders", "SizedPlan", "Cost", "class_sizes",
           "DEFAULT_MEMORY_CAP", "SpecError", "TengradError", "ROLES", "parse_axes", "parse_equation",
           "format_axes"]
