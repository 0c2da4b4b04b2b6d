"""Module hooks that are switched off while no curvature is due, and on again in their old place.

TENGraD's capture inside a forward runs in per-forward wrappers (forward_wrap.py), not hooks; what is
left here are hooks on the root model (op_capture.py's exit hook, the consistency check's forward
hook, the capture of a block whose module is the root itself), whose on/off switch this keeps in order.

A module with any forward hook leaves torch's fast call path (``Module._call_impl`` runs its hook
machinery: about 5-10 us of Python per call on a 2-core EPYC), so a model with a dozen hooked layers
pays a few percent per step even when every hook returns at once. TENGraD's hooks are needed only
on steps whose curvature is due (update_freq k: one step in k), so they sit in a ``HookSet`` that
the gate (``OpCapture._enter``) switches off on the other steps.

``off()`` takes each hook's entry out of the module's hook dicts (and the ``with_kwargs`` /
``always_call`` dicts its handle names) and remembers the order of the dict; ``on()`` puts it back
at the same place among the hooks that were there, so a hook the user registered before or after
the optimizer keeps running before or after TENGraD's as it did (new hooks registered while the set
was off: prepended ones stay first, others run after the ones that were there).
"""
from __future__ import annotations

from torch.utils.hooks import RemovableHandle


class HookSet:
    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []
        self.active = True
        self._saved: list = []

    def add(self, handle: RemovableHandle) -> RemovableHandle:
        """Track a hook just registered (by its handle); returns the handle."""
        self.handles.append(handle)
        if not self.active:                    # registered while off: take it out at once
            self._take_out([handle])
        return handle

    def off(self) -> None:
        if self.active:
            self.active = False
            self._take_out(self.handles)

    def _take_out(self, handles) -> None:
        orders: dict[int, list] = {}
        for handle in handles:
            d = handle.hooks_dict_ref()
            if d is None or handle.id not in d:
                continue
            if id(d) not in orders:
                orders[id(d)] = list(d.keys())
            extras = [(ref(), ref()[handle.id]) for ref in handle.extra_dict_ref
                      if ref() is not None and handle.id in ref()]
            fn = d.pop(handle.id)
            for e, _ in extras:
                del e[handle.id]
            self._saved.append((handle, d, orders[id(d)], fn, extras))

    def on(self) -> None:
        if self.active:
            return
        self.active = True
        saved, self._saved = self._saved, []
        by_dict: dict[int, tuple[dict, list, dict]] = {}
        for handle, d, order, fn, extras in saved:
            for e, v in extras:
                e[handle.id] = v
            entry = by_dict.setdefault(id(d), (d, order, {}))
            entry[2][handle.id] = fn
        for d, order, ours in by_dict.values():
            _restore(d, order, ours)

    def remove(self) -> None:
        self.on()
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _restore(d: dict, order: list, ours: dict) -> None:
    """Put ``ours`` back into hook dict ``d`` at their places in ``order`` (the keys when taken out)."""
    now = list(d.items())
    known = set(order)
    first_known = next((i for i, (k, _) in enumerate(now) if k in known), len(now))
    front = [kv for kv in now[:first_known] if kv[0] not in known]      # prepended while off
    back = [kv for kv in now[first_known:] if kv[0] not in known]       # appended while off
    present = dict(now)
    middle = [(k, ours[k]) if k in ours else (k, present[k]) for k in order if k in ours or k in present]
    d.clear()
    d.update(front + middle + back)


class OwnHook:
    """A hook TENGraD registers on the user's model: calls ``fn``. A copy of the model
    (``copy.deepcopy(model)``, as for an EMA twin, or a pickle) gets a hook that does nothing instead
    of a deep copy of the optimizer behind ``fn``: the copy is a plain model, neither a second front
    end of this optimizer nor a half-copied one that fails in its first forward."""

    __slots__ = ("fn",)

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo) -> "Inert":
        return Inert()

    def __reduce__(self):
        return (Inert, ())


class Inert:
    """What a copied TENGraD hook becomes: returns None (leaves the call as it is)."""

    def __call__(self, *args, **kwargs) -> None:
        return None
