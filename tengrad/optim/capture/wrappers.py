"""Per-forward instance wrappers: how TENGraD's capture runs inside a module's forward without hooks.

A module with any forward hook leaves torch's fast call path: ``Module._call_impl`` then runs its hook
machinery in Python on every call, even when every hook returns at once, and switching hooks on and
off between steps (so that reuse steps pay nothing) costs per module each time (hooks.py's ``HookSet``
keeps the dicts' order); the numbers are in docs/experiments/capture-overhead.md. An *instance
attribute* ``forward`` is what ``_call_impl`` calls on its fast path
(``forward_call = self.forward``), so a wrapper installed as ``module.__dict__["forward"]`` costs one
Python call per module call, and installing or taking it away is a dict write.

TENGraD installs such wrappers for one captured root forward and the backward through it
(ops.py: the root's gate pre-hook installs them; when the forward returns, a hook on its output
queues an engine callback that takes them away as that backward ends, so module forwards autograd
re-runs inside it - reentrant activation checkpointing - are captured too; at once when the forward
raises or no output requires grad; the next forward, ``zero_grad()`` and ``step()`` take away any left).
Between steps no module carries one. A copy of a module taken while one is installed
(``copy.deepcopy``, pickling) gets the module's own forward instead (``Installed.__deepcopy__`` /
``__reduce__``), never a wrapper that would run the original module.

``install(module, makers, key)``: ``makers()`` returns functions ``make(inner) -> forward``, outermost first;
the innermost wraps the module's own forward (the class forward, or an instance ``forward`` the user
set, which is put back afterwards). One module gets one composed wrapper per forward; ``restore()``
puts every module back, last installed first. The composed wrapper is kept per (module, ``key``) and
reused while the module's own forward is the same (the makers' closures hold no per-call state), so a
captured forward costs a dict write per module, not a rebuild of closures.
"""
from __future__ import annotations

import copy
import types
from typing import Callable

from torch import nn

Maker = Callable[[Callable], Callable]


class Installed:
    """The composed wrapper as a module's instance ``forward``. Calls ``fn``; its copies are the
    module's own forward: the user's instance forward (copied), else the copy's class forward bound
    to the copy (what it would run without an instance forward)."""

    __slots__ = ("fn", "module", "own")

    def __init__(self, fn: Callable, module: nn.Module, own) -> None:
        self.fn, self.module, self.own = fn, module, own

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        if self.own is not None:
            return copy.deepcopy(self.own, memo)
        twin = memo.get(id(self.module), self.module)     # the module's copy (registered before its state)
        return types.MethodType(type(twin).forward, twin)

    def __reduce__(self):
        if self.own is not None:
            return (_same, (self.own,))
        return (_bind, (type(self.module).forward, self.module))


def _same(x):
    return x


def _bind(fn: Callable, obj: object):
    return types.MethodType(fn, obj)


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
            fwd = Installed(fwd, module, own)
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
