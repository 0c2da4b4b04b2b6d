"""tengrad_ir: the layer IR of tengrad, pure Python (sympy, opt_einsum); never imports torch or triton.

A layer is a ``LayerSpec`` in index notation; ``derive`` gives its einsums (Jacobian, covariances,
Gram, J p, J^T u), ``enumerate_orders`` its evaluation orders as programs of ``steps`` with costs
summed over the steps (the operand kind, ``operand``, supplies the steps that read the input), and
``SizedPlan`` the choice for concrete sizes among the orders a backend runs.
"""
from .derive import Derivation, derive
from .einsum import Einsum, Tensor
from .errors import SpecError, TengradError
from .index_map import IndexMap
from .notation import format_axes, parse_axes, parse_equation
from .geometry import ConvGeometry, TransposedGeometry, conv_geometry, raw_factorable, transposed_geometry
from .operand import KINDS, OperandKind, kind_of
from .orders import PROGRAMS, QUANTITIES, Order, enumerate_orders
from .steps import Step
from .plan import DEFAULT_MEMORY_CAP, Cost, SizedPlan, class_sizes
from .spec import ROLES, LayerSpec

__all__ = ["LayerSpec", "IndexMap", "Einsum", "Tensor", "Derivation", "derive", "Order", "ConvGeometry",
           "conv_geometry", "raw_factorable", "TransposedGeometry", "transposed_geometry", "enumerate_orders",
           "SizedPlan", "Cost", "class_sizes",
           "DEFAULT_MEMORY_CAP", "SpecError", "TengradError", "ROLES", "parse_axes", "parse_equation",
           "format_axes", "Step", "OperandKind", "KINDS", "kind_of", "QUANTITIES", "PROGRAMS"]
