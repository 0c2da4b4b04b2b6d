"""The LM probe (lab/lm_prior_probe.py) with pytorch_optimizer's SOAP changed toward TENGraD's step
(docs/experiments/lm-prior-soap.md, "Momentum"). env VARIANT, a comma list of: hb (heavy-ball 0.9 on the
preconditioned direction at lr * 0.1, no bias correction: TENGraD's momentum), hb95 (the same at 0.95,
lr * 0.05), stale (v before this step's gradient; broken at step 1, where v = 0 divides by eps).

    VARIANT=hb95 .venv/bin/python lab/soap_variant_probe.py '[dict(method="soap", lr=3e-3, weight_decay=0.01)]' 300
"""
import os, sys, inspect, types
import pytorch_optimizer.optimizer.soap as S
src = inspect.getsource(S)
var = set(os.environ.get("VARIANT", "").split(","))
def rep(a, b):
    global src
    assert a in src, a
    src = src.replace(a, b)
if "hb" in var and "hb95" not in var:
    rep("exp_avg.lerp_(grad, weight=1.0 - beta1)", "pass")
    rep("exp_avg_projected / de_nom", "grad_projected / de_nom")
    rep("p.add_(norm_grad, alpha=-step_size)", "exp_avg.mul_(0.9).add_(norm_grad); p.add_(exp_avg, alpha=-group['lr'] * 0.1)")
if "hb95" in var:
    rep("exp_avg.lerp_(grad, weight=1.0 - beta1)", "pass")
    rep("exp_avg_projected / de_nom", "grad_projected / de_nom")
    rep("p.add_(norm_grad, alpha=-step_size)", "exp_avg.mul_(0.95).add_(norm_grad); p.add_(exp_avg, alpha=-group['lr'] * 0.05)")
if "stale" in var:
    rep("exp_avg_sq.lerp_(grad_projected.square(), weight=1.0 - beta2)\n", "")
    rep("de_nom = exp_avg_sq.sqrt().add_(group['eps'])", "de_nom = exp_avg_sq.sqrt().add_(group['eps']); exp_avg_sq.lerp_(grad_projected.square(), weight=1.0 - beta2)")
mod = types.ModuleType(S.__name__); mod.__file__ = S.__file__
exec(compile(src, S.__file__, "exec"), mod.__dict__)
import pytorch_optimizer
pytorch_optimizer.SOAP = mod.SOAP
import torch; torch.set_num_threads(1)
sys.argv = ["lab/lm_prior_probe.py", sys.argv[1]] + sys.argv[2:]
exec(compile(open("lab/lm_prior_probe.py").read(), "lab/lm_prior_probe.py", "exec"), {"__name__": "__main__"})
