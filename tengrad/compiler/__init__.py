"""The compile unit: ``tengrad.compile(module)`` -> ``CompiledLayer``.

    terms.py        which registered spec factory describes the module (term matching)
    binding.py      index sizes from the tensors' shapes (``Shapes``), index-level layouts
    checks.py       the argument checks of ``gram/jvp/vjp/jacobian`` (shapes, dtypes, devices)
    module_plan.py  the sized plans of a module's terms together (``ModulePlan``)
    compiled.py     ``CompiledLayer``: binding, plan cache, backend choice, the four quantities
"""
from .compiled import CompiledLayer
from .module_plan import ModulePlan

__all__ = ["CompiledLayer", "ModulePlan"]
