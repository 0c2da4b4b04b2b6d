"""Per-forward instance wrappers: how TENGraD's capture runs inside a module's forward without hooks.

A module with any forward hook leaves torch's fast call path: ``Module._call_impl`` then runs its hook
machinery, about 5 us of Python per call on a 2-core EPYC even when every hook returns at once, and
switching hooks on and off between steps (so that reuse steps pay nothing) costs 10-20 us per module
each time (hookset.py keeps the dicts' order). An *instance attribute* ``forward`` is what
``_call_impl`` calls on its fast path (``forward_call = self.forward``), so a wrapper installed as
``module.__dict__["forward"]`` costs one Python call per module call, and installing or taking it
away is a dict write.

TENGraD installs such wrappers only for the duration of one captured root forward (op_capture.py:
the root's gate pre-hook installs them, its ``always_call`` forward hook takes them away, also when the
forward raises), never between forwards: a model copied (``copy.deepcopy``) or pickled between steps
carries no wrapper bound to this optimizer.

``install(module, makers, key)``: ``makers()`` returns functions ``make(inner) -> forward``, outermost first;
the innermost wraps the module's own forward (the class forward, or an instance ``forward`` the user
set, which is put back afterwards). One module gets one composed wrapper per forward; ``restore()``
puts every module back, last installed first. The composed wrapper is kept per (module, ``key``) and
reused while the module's own forward is the same (the makers' closures hold no per-call state), so a
captured forward costs a dict write per module, not a rebuild of closures.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

Maker = Callable[[Callable], Callable]


class ForwardWraps:
    def __init__(self) -> None:
        self.installed: list[tuple[nn.Module, object]] = []   # (module, its own instance forward or None)
        self._built: dict[tuple[int, object], tuple[object, object, Callable]] = {}

    def install(self, module: nn.Module, makers: Callable[[], list[Maker]], key: object = None) -> None:
        """Install the composition of ``makers()`` (called only when no wrapper is kept for ``key``)."""
        own = module.__dict__.get("forward")
        base = own if own is not None else type(module).forward
        hit = self._built.get((id(module), key))
        if hit is not None and hit[0] is module and hit[1] is base:
            fwd = hit[2]
        else:
            fwd = own if own is not None else module.forward
            for make in reversed(makers()):
                fwd = make(fwd)
            if len(self._built) > 4096:          # modules come and go (promotion, new models): bound it
                self._built.clear()
            self._built[(id(module), key)] = (module, base, fwd)
        module.__dict__["forward"] = fwd
        self.installed.append((module, own))

    def forget(self) -> None:
        """Drop the kept wrappers (the makers changed)."""
        self._built.clear()

    def restore(self) -> None:
        installed, self.installed = self.installed, []
        for module, own in reversed(installed):
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = own
