"""The least a Python-level capture can do per use: a reference arm for capture_overhead.py, not part
of tengrad.

TENGraD's capture (tengrad/optim/op_capture.py, capture.py) needs, per call of a parameter-reading op
in a curvature-due training forward, the op's input x [m, ...] and its output gradient
gy = dL/dy [m, ...] kept until the step. Done from Python, whatever the bookkeeping, that is at least

* forward: one Python call around the op (here: the functional op replaced by a wrapper for the
  duration of the forward: no TorchFunctionMode, no module hooks), one identity lookup of the weight
  in the parameter dict, ``x.detach()`` and one tensor hook registered on the output, the cheapest
  way Python has (capture.keep_grad's: a hook dict bound to the output's node, ~1 us, against
  ~17 us for ``Tensor.register_hook`` on a 2-core EPYC);
* backward: one Python call per captured output (the hook storing gy);
* memory: x and gy alive from the forward/backward until the step (the allocator sees a higher peak).

``tap="cpp"`` replaces the Python hook by a C++ one (``cpp_tap()``: a torch extension compiled on first
use with ``torch.utils.cpp_extension.load_inline``, about 40 s, cached; it needs a C++ compiler and
ninja): ``tap(out, store, slot)`` registers a C++ lambda on the output that keeps gy in a C++ vector,
so the backward calls no Python at all. What is left is the floor of *any* per-use capture in eager
PyTorch: the wrapper call, the detach, one hook registration and gy kept alive.

``FloorCapture(model)`` does exactly that for ``F.linear``, ``F.layer_norm``, ``F.embedding`` and
``F.conv2d`` (every parameter use of the 3C1F and Transformer benchmark models; inside
``F.multi_head_attention_forward`` too, which calls functional's module-level ``linear``). It builds
no plan, no Gram, checks nothing; it only shows the floor under TENGraD's armed-step overhead.
"""
from __future__ import annotations

import os

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CPP = r"""
#include <torch/extension.h>
#include <memory>
#include <vector>

struct Store {
  std::vector<at::Tensor> grads;
  void clear() { grads.clear(); }
  at::Tensor get(int64_t i) { return i < (int64_t)grads.size() ? grads[i] : at::Tensor(); }
  int64_t size() { return (int64_t)grads.size(); }
};

// keep dL/d(out) in store->grads[slot] when the backward reaches out (accumulated over passes)
void tap(const at::Tensor& out, const std::shared_ptr<Store>& store, int64_t slot) {
  if ((int64_t)store->grads.size() <= slot) store->grads.resize(slot + 1);
  std::weak_ptr<Store> weak = store;
  out.register_hook([weak, slot](const at::Tensor& g) -> at::Tensor {
    if (auto s = weak.lock()) {
      auto& cur = s->grads[slot];
      cur = cur.defined() ? cur + g : g;
    }
    return at::Tensor();
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Store, std::shared_ptr<Store>>(m, "Store")
      .def(py::init<>()).def("clear", &Store::clear).def("get", &Store::get).def("size", &Store::size);
  m.def("tap", &tap);
}
"""


#: a build lock older than this belongs to a build that was killed (a build takes ~40 s, ~2 min under
#: load): torch's lock has no timeout, so a stale one would make every later build wait forever
STALE_LOCK_S = 180.0


def cpp_tap():
    """The compiled C++ tap (module with ``Store`` and ``tap``); raises when it cannot be built.
    Built in its own directory under the temp dir, per torch version. A build lock is waited for until it
    goes (a build in another process) or is ``STALE_LOCK_S`` old (a killed build's), then removed."""
    import tempfile
    import time

    from torch.utils.cpp_extension import load_inline
    build = os.path.join(tempfile.gettempdir(), f"tengrad_floor_tap-torch{torch.__version__.replace('+', '-')}")
    os.makedirs(build, exist_ok=True)
    lock = os.path.join(build, "lock")
    while True:
        try:
            if time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
                os.remove(lock)
                break
        except FileNotFoundError:
            break
        time.sleep(1.0)
    return load_inline("tengrad_floor_tap", cpp_sources=[_CPP], extra_cflags=["-O2"], verbose=False,
                       build_directory=build)


def _keep(out: Tensor, use: list) -> None:
    """gy of ``out`` into ``use[1]`` by a hook dict bound to the output's node (capture.keep_grad)."""
    def keep(g):
        use[1] = g
    if out.grad_fn is None or out._backward_hooks is not None:
        out.register_hook(keep)
        return
    out._backward_hooks = OrderedDict(((0, keep),))
    out.grad_fn._register_hook_dict(out)

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

    def __init__(self, model: nn.Module, tap: str = "python") -> None:
        self.model = model
        self.ids = {id(p) for p in model.parameters() if p.requires_grad}
        self.uses: list[list] = []           # [x, gy] per captured call (cpp: gy read by ``grads()``)
        self.active = False
        self.tap = tap
        self._cpp = cpp_tap() if tap == "cpp" else None
        self._store = self._cpp.Store() if tap == "cpp" else None
        self._orig = {name: getattr(F, name) for name in OPS}
        self._wrapped = {name: self._wrap(self._orig[name], pos) for name, pos in OPS.items()}

    def _wrap(self, op, pos: int):
        ids, uses = self.ids, self.uses
        cpp, store = (self._cpp.tap, self._store) if self._cpp is not None else (None, None)

        def call(*args, **kwargs):
            out = op(*args, **kwargs)
            if not self.active:
                return out
            w = args[pos] if len(args) > pos else kwargs.get("weight")
            if isinstance(w, Tensor) and (id(w) in ids or (w._base is not None and id(w._base) in ids)):
                use = [args[0].detach(), None]
                if cpp is not None:
                    cpp(out, store, len(uses))
                else:
                    _keep(out, use)
                uses.append(use)
            return out
        return call

    def grads(self) -> list:
        """gy per captured call, in call order (either tap)."""
        if self._store is None:
            return [gy for _, gy in self.uses]
        return [self._store.get(i) for i in range(len(self.uses))]

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
        if self._store is not None:
            self._store.clear()
