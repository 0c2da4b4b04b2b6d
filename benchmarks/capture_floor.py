"""The least a Python-level capture can do per use: a reference arm for capture_overhead.py, not part
of tengrad.

TENGraD's capture (tengrad/optim/op_capture.py, capture.py) needs, per call of a parameter-reading op
in a curvature-due training forward, the op's input x [m, ...] and its output gradient
gy = dL/dy [m, ...] kept until the step. Done from Python, whatever the bookkeeping, that is at least

* forward: one Python call around the op (here: the functional op replaced by a wrapper for the
  duration of the forward: no TorchFunctionMode, no module hooks), one identity lookup of the weight
  in the parameter dict, ``x.detach()`` and one tensor hook registered on the output;
* backward: one Python call per captured output (the hook storing gy);
* memory: x and gy alive from the forward/backward until the step (the allocator sees a higher peak).

``FloorCapture(model)`` does exactly that for ``F.linear``, ``F.layer_norm``, ``F.embedding`` and
``F.conv2d`` (every parameter use of the 3C1F and Transformer benchmark models; inside
``F.multi_head_attention_forward`` too, which calls functional's module-level ``linear``). It builds
no plan, no Gram, checks nothing; it only shows the floor under TENGraD's armed-step overhead.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

#: functional op -> position of its weight argument
OPS = {"linear": 1, "layer_norm": 2, "embedding": 1, "conv2d": 1}


class FloorCapture:
    """Install with ``install()`` (once: the wrappers go into torch.nn.functional and pass straight
    through while inactive), run ``forward(x)`` for a captured forward, ``uninstall()`` at the end.
    The wrappers stay in place between forwards on purpose: every write to torch.nn.functional's
    globals invalidates CPython's specialised lookups in all of that module's functions (measured:
    writing three of them before and after each forward, even with their own values, added 0.25-0.35
    ms to a 1.7 ms forward), a cost a capture needs not pay, so the floor does not either. While
    installed, every functional call of the process pays one pass-through Python call, the SGD
    baseline measured beside the floor included."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.ids = {id(p) for p in model.parameters() if p.requires_grad}
        self.uses: list[list] = []           # [x, gy] per captured call
        self.active = False
        self._orig = {name: getattr(F, name) for name in OPS}
        self._wrapped = {name: self._wrap(self._orig[name], pos) for name, pos in OPS.items()}

    def _wrap(self, op, pos: int):
        ids, uses = self.ids, self.uses

        def call(*args, **kwargs):
            out = op(*args, **kwargs)
            if not self.active:
                return out
            w = args[pos] if len(args) > pos else kwargs.get("weight")
            if isinstance(w, Tensor) and (id(w) in ids or (w._base is not None and id(w._base) in ids)):
                use = [args[0].detach(), None]
                uses.append(use)

                def keep(g, use=use):
                    use[1] = g
                out.register_hook(keep)
            return out
        return call

    def install(self) -> None:
        for name, fn in self._wrapped.items():
            setattr(F, name, fn)

    def uninstall(self) -> None:
        for name, fn in self._orig.items():
            setattr(F, name, fn)

    def forward(self, *args, **kwargs):
        """A captured forward of the model (the wrappers must be installed)."""
        self.active = True
        try:
            return self.model(*args, **kwargs)
        finally:
            self.active = False

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)
        self.uses.clear()
