"""The real architectures of ``benchmarks/step.py --models transformer resnet`` (issue 8).

* ``transformer``: examples/transformer_lm.py's TinyLM (Embedding + positional Embedding, 2
  ``nn.TransformerEncoderLayer`` with causal mask, final LayerNorm, output head tied to the embedding
  through ``F.linear(h, emb.weight)``) at ``--d-model``, on [batch, 12] token ids of its toy language.
* ``resnet``: examples/resnet_bn.py's ResNet (conv stem + BatchNorm, two BasicBlocks with BatchNorm
  and a projected shortcut, linear head) at ``--width``, on random [batch, 1, 8, 8] images (the
  digits' shape; timing does not need the data).

Per model: SGD with momentum; TENGraD (empirical Fisher) update step (curvature every step) and
reuse step (kept curvature); ASDL 0.1a5 K-FAC (``KfacGradientMaker``, empirical Fisher) update and
reuse step as the 3C1F rows. ASDL is tried as a user would (default config, the model's own loss);
when that raises, the error is the row, and a second row tries the smallest change that lets it run
(``ignore_modules`` for the module types it refuses, a loss module with a ``reduction`` attribute),
with the parameter tensors whose gradient it actually preconditions counted on one step (the
direction of ``p.grad`` changed against plain autograd's; a scale of the whole gradient is not a
change).
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import asdl_step, torch_step

NEVER = 10 ** 9
_EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class SeqCrossEntropy(nn.Module):
    """The Transformer example's loss as a module with ``reduction`` (ASDL calls loss_fn with it)."""

    reduction = "mean"

    def forward(self, logits, y):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction=self.reduction)


class ModelBench:
    """Step functions of every method for one real architecture (each with its own model copy)."""

    def __init__(self, name: str, batch: int, damping: float, d_model: int = 64, width: int = 16,
                 seed: int = 0) -> None:
        self.name, self.batch, self.damping, self.seed = name, batch, damping, seed
        g = torch.Generator().manual_seed(seed)
        if name == "transformer":
            lm = _example("transformer_lm")
            self._build = lambda: lm.TinyLM(d_model=d_model)
            self.x, self.y = lm.batch(g, n=batch)
            self.loss = lm.loss_fn
            self.size = f"d_model {d_model}, 2 layers, 2 heads, seq 12, vocab 12"
            # what ASDL refuses as is (found by trying; see ``kfac``)
            self.asdl_ignore = [nn.modules.linear.NonDynamicallyQuantizableLinear, nn.Embedding]
            self.asdl_loss = SeqCrossEntropy()
        elif name == "resnet":
            rn = _example("resnet_bn")
            self._build = lambda: rn.ResNet(width)
            self.x = torch.randn(batch, 1, 8, 8, generator=g)
            self.y = torch.randint(0, 10, (batch,), generator=g)
            self.loss = F.cross_entropy
            self.size = f"width {width} (stem, 2 BasicBlocks, BatchNorm), 8x8 inputs"
            self.asdl_ignore = []
            self.asdl_loss = F.cross_entropy
        else:
            raise ValueError(f"unknown model {name!r}: transformer or resnet")
        self.n_tensors = sum(1 for p in self.model().parameters() if p.requires_grad)
        self.n_params = sum(p.numel() for p in self.model().parameters() if p.requires_grad)
        self.notes: dict[str, str] = {}

    def model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return self._build().train()

    def torch_step(self, model, opt):
        return torch_step(model, opt, self.x, self.y, self.loss)

    def asdl_step(self, model, gm, loss):
        return asdl_step(model, gm, self.x, self.y, loss)

    # each returns {kind: step}; "every" or "update"/"reuse" as in step.py's Bench
    def sgd(self):
        m = self.model()
        return {"every": self.torch_step(m, torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9))}

    def tengrad(self, package=None):
        """``package``: another tengrad (``step.py --baseline``), else the working tree's."""
        import tengrad

        package = package or tengrad
        steps = {}
        for kind, k in (("update", 1), ("reuse", NEVER)):
            m = self.model()
            opt = package.TENGraD(m, 1e-3, self.damping, momentum=0.9, update_freq=k, fisher="empirical", prior=None)
            steps[kind] = self.torch_step(m, opt)
        covered = self.n_tensors - len(opt.fallback)
        self.notes["tengrad" if package is tengrad else "baseline"] = (f"{len(opt.blocks)} exact blocks, {covered} of {self.n_tensors} parameter "
                                 f"tensors preconditioned (fallback: {len(opt.fallback)})")
        return steps

    def _kfac_steps(self, ignore, loss):
        from asdl import KfacGradientMaker, PreconditioningConfig

        steps = {}
        for kind, k in (("update", 1), ("reuse", NEVER)):
            m = self.model()
            cfg = PreconditioningConfig(data_size=self.batch, damping=self.damping, ignore_modules=ignore or None,
                                        preconditioner_upd_interval=k, curvature_upd_interval=k)
            steps[kind] = self.asdl_step(m, KfacGradientMaker(m, cfg, fisher_type="fisher_emp"), loss)
        return steps

    def _preconditioned(self, ignore, loss) -> int:
        """How many parameter tensors one ASDL step changes the gradient direction of."""
        from asdl import KfacGradientMaker, PreconditioningConfig

        m, ref = self.model(), self.model()
        self.loss(ref(self.x), self.y).backward()
        gm = KfacGradientMaker(m, PreconditioningConfig(data_size=self.batch, damping=self.damping,
                                                        ignore_modules=ignore or None), fisher_type="fisher_emp")
        dummy = gm.setup_model_call(m, self.x)
        gm.setup_loss_call(loss, dummy, self.y)
        gm.forward_and_backward()
        changed = 0
        for p, q in zip(m.parameters(), ref.parameters()):
            if p.grad is not None and q.grad is not None:
                cos = float(F.cosine_similarity(p.grad.flatten().double(), q.grad.flatten().double(), dim=0))
                changed += cos < 1 - 1e-6
        return changed

    def kfac(self):
        """ASDL K-FAC as a user would call it: {} and a note when it raises (the note is the row)."""
        try:
            steps = self._kfac_steps([], self.loss)
            for s in steps.values():
                s()
            self.notes["kfac"] = f"preconditions {self._preconditioned([], self.loss)} of {self.n_tensors} tensors"
            return steps
        except Exception as exc:      # noqa: BLE001 - the failure is what the table reports
            self.notes["kfac"] = f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            return {}

    def kfac_ignoring(self):
        """ASDL K-FAC with the module types it refuses ignored and a loss module with ``reduction``."""
        if not self.asdl_ignore and self.asdl_loss is self.loss:
            return {}
        names = ", ".join(t.__name__ for t in self.asdl_ignore)
        try:
            steps = self._kfac_steps(self.asdl_ignore, self.asdl_loss)
            for s in steps.values():
                s()
            n = self._preconditioned(self.asdl_ignore, self.asdl_loss)
            self.notes["kfac_ignoring"] = (f"ignore_modules=[{names}], loss with `reduction`: preconditions "
                                           f"{n} of {self.n_tensors} tensors")
            return steps
        except Exception as exc:      # noqa: BLE001
            self.notes["kfac_ignoring"] = f"ignore_modules=[{names}]: raised {type(exc).__name__}: {exc}"
            return {}

