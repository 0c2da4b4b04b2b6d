"""The optimizers of ``tta.py``: one training step per method, for any model and loss.

Methods (arms) and their hyperparameters ``hp``:

* ``sgd``: torch.optim.SGD(lr, momentum 0.9, weight_decay; coupled).
* ``adamw``: torch.optim.AdamW(lr, weight_decay; decoupled), betas (0.9, 0.999).
* ``soap``: ``pytorch_optimizer.SOAP`` (Adam in Shampoo's eigenbasis; lr, weight_decay, betas (0.95, 0.95),
  precondition_frequency 10: the package's defaults), from the optional ``bench`` extra.
* ``kfac``: ASDL 0.1a5 ``KfacGradientMaker`` (empirical Fisher; damping; curvature and inverse every
  ``update_freq`` = 10 steps) feeding SGD(lr, momentum 0.9, weight_decay), from the ``bench`` extra.
* ``tengrad``: ``tengrad.TENGraD(model, **hp)``: its defaults (only weight_decay tuned): prior "soap" with
  SOAP's step around the rows (step_rule "adam"), lr 3e-3, damping 0.1, momentum 0.95.
* ``tengrad-tuned``: the same optimizer at a tuned (lr, damping).
* ``tengrad-natural``: ``tengrad.TENGraD(model, prior=None, **hp)``: the paper's step at its defaults (lr 0.3,
  damping 1, kl_clip 6.4e-3 with the noise ratio; TENGraD's defaults until 2026-12-08), weight_decay tuned.
* ``tengrad-prior``: ``tengrad.TENGraD(model, prior="adam", **hp)``: Adam's diagonal as the prior outside
  the rows (tengrad/optim/curvature/prior.py), otherwise the defaults (only weight_decay tuned).
* ``tengrad-soap``: ``tengrad.TENGraD(model, prior="soap", step_rule="natural", **hp)``: SOAP's preconditioner
  (Adam in Shampoo's eigenbasis) as the prior outside the paper's step (tengrad/optim/curvature/eigenbasis.py);
  lr tuned. With ``"step_rule": "adam"`` in hp (and kl_clip None, lr ~3e-3, momentum 0.95): SOAP's step around
  the rows, the defaults' rule.

A method whose package is not installed raises ``NotRun`` (reported as "not run", never as divergence).
"""
from __future__ import annotations

import importlib.util
import math

import torch

METHODS = ("sgd", "adamw", "soap", "kfac", "tengrad", "tengrad-tuned", "tengrad-natural", "tengrad-prior",
           "tengrad-soap")
#: the arms that are TENGraD (the verdict's subjects; the others are its peers)
TENGRAD_ARMS = tuple(m for m in METHODS if m.startswith("tengrad"))
#: the TENGraD arms that run with a prior (tengrad/optim/curvature/prior.py, eigenbasis.py)
PRIORS = {"tengrad-natural": None, "tengrad-prior": "adam", "tengrad-soap": "soap"}
#: the peers' labels do not say "tuned": whether a run's point came from its grid or is the task's
#: fallback point (``--no-tune``) is printed with its hyperparameters (tune.py)
LABELS = {"sgd": "SGD + momentum", "adamw": "AdamW", "soap": "SOAP",
          "kfac": "ASDL K-FAC", "tengrad": "TENGraD (defaults)", "tengrad-tuned": "TENGraD (tuned)",
          "tengrad-natural": "TENGraD (the paper's step, prior=None)",
          "tengrad-prior": "TENGraD (prior='adam')", "tengrad-soap": "TENGraD (prior='soap')"}


def label(method: str, hp: dict) -> str:
    """The arm's label: LABELS', except a prior arm whose hp names another prior (a ``--hp`` that runs
    ``tengrad-prior`` with ``"prior": "soap"``) is labelled by the prior it ran with and the arm's name,
    which tells it from the arm of that prior; a step_rule other than "natural" is named too."""
    given = (hp or {}).get("prior", PRIORS.get(method))
    rule = (hp or {}).get("step_rule", "natural")
    if method in PRIORS and given != PRIORS[method]:
        out = f"TENGraD (prior={given!r}, as {method})"
    else:
        out = LABELS.get(method, method)
    return out if rule == "natural" else out[:-1] + f", step_rule={rule!r})"


PACKAGES = {"soap": ("pytorch_optimizer", "pip install pytorch-optimizer (the bench extra)"),
            "kfac": ("asdl", "pip install asdfghjkl==0.1a5 (the bench extra)")}


class NotRun(Exception):
    """The method cannot run here (its optional package is missing); the message says how to get it."""


def available(method: str) -> str:
    """'' when ``method`` can run here, else why not."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if method in PACKAGES:
        mod, how = PACKAGES[method]
        if importlib.util.find_spec(mod) is None:
            return f"not run: no module {mod!r} ({how})"
    return ""


def _guarded(opt, model, loss_fn, forward_backward=None):
    """step(x, y) -> loss: zero_grad, forward, backward, and the optimizer step if the loss is finite."""
    def step(x, y):
        opt.zero_grad()
        if forward_backward is None:
            loss = loss_fn(model(x), y)
            loss.backward()
        else:
            loss = forward_backward(x, y)
        lv = float(loss)
        if math.isfinite(lv):
            opt.step()
        return lv
    return step


def with_reduction(loss_fn):
    """``loss_fn(out, y)`` (a task's batch-mean loss) with the ``reduction`` argument ASDL's K-FAC passes
    (it refuses a loss without one: "loss_fn has to have "reduction" option", which every tuning cell of
    the first full 3C1F run hit and reported as a divergence): "mean" is the loss itself, "sum" the mean
    times the batch's samples (dimension 0 of the output: images, or sequences for the LM)."""
    def loss(out, y, reduction="mean"):
        value = loss_fn(out, y)
        if reduction == "mean":
            return value
        if reduction == "sum":
            return value * out.shape[0]
        raise ValueError(f"reduction {reduction!r}: only 'mean' and 'sum'")
    return loss


def make_step(method: str, model, hp: dict, loss_fn, batch: int):
    """(step, optimizer) for ``method`` at ``hp``; ``step(x, y)`` does one full training step and returns
    the minibatch loss (a float). Raises ``NotRun`` when the method's package is missing."""
    why = available(method)
    if why:
        raise NotRun(why)
    hp = dict(hp)
    wd = hp.pop("weight_decay", 0.0)
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=hp.pop("lr"), momentum=hp.pop("momentum", 0.9), weight_decay=wd)
    elif method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=hp.pop("lr"), weight_decay=wd)
    elif method == "soap":
        from pytorch_optimizer import SOAP

        opt = SOAP(model.parameters(), lr=hp.pop("lr"), weight_decay=wd)
    elif method in TENGRAD_ARMS:
        import tengrad

        if method in PRIORS:
            hp.setdefault("prior", PRIORS[method])
            hp.setdefault("step_rule", "natural")      # the paper's step under the prior, unless hp names a rule
        opt = tengrad.TENGraD(model, weight_decay=wd, **hp)
        hp = {}
    elif method == "kfac":
        from asdl import KfacGradientMaker, PreconditioningConfig

        k = int(hp.pop("update_freq", 10))
        cfg = PreconditioningConfig(data_size=batch, damping=hp.pop("damping"), preconditioner_upd_interval=k,
                                    curvature_upd_interval=k)
        gm = KfacGradientMaker(model, cfg, fisher_type="fisher_emp")
        opt = torch.optim.SGD(model.parameters(), lr=hp.pop("lr"), momentum=hp.pop("momentum", 0.9), weight_decay=wd)

        asdl_loss = with_reduction(loss_fn)

        def forward_backward(x, y):
            dummy = gm.setup_model_call(model, x)
            gm.setup_loss_call(asdl_loss, dummy, y)
            _, loss = gm.forward_and_backward()
            return loss
        if hp:
            raise ValueError(f"kfac: unknown hyperparameters {sorted(hp)}")
        return _guarded(opt, model, loss_fn, forward_backward), opt
    if hp:
        raise ValueError(f"{method}: unknown hyperparameters {sorted(hp)}")
    return _guarded(opt, model, loss_fn), opt
