"""TENGraD: exact per-layer (block-diagonal) natural gradient through the Woodbury identity.

The paper's update (equation 4), per Fisher block (one module's trainable parameters), with m samples::

    d = (F + a I)^-1 g = (1/a) (g - J^T (K + m a I)^-1 J g),     F = J^T J / m,  K = J J^T

Layers, top to bottom (docs/architecture.md walks a step through them):

    optimizer.py   ``TENGraD``: validate, take the capture's uses, ask the estimator for directions,
                   update, commit
    options.py     defaults, hyperparameter rules, param groups, batch-dimension declarations
    update.py      gradient with weight decay, finiteness, KL clip with the noise ratio, momentum update
    noise.py       the gradient-noise ratio r of the KL clip
    checkpoint.py  state_dict's extra entry and an all-or-nothing load_state_dict
    explain.py     ``opt.explain()`` and the fallback warning
    estimator/     when blocks refresh and the step's directions: local (plain, staggered, shared
                   blocks) and distributed (exact global batch, averaged) estimators, collectives
    curvature/     blocks, the rules from captured uses to Jacobian rows, the Woodbury maths, the
                   Fisher's rows, the path choice, consistency checks
    capture/       the capture pass: the root gate, per-forward wrappers, the op-level mode, gradient
                   hooks, and ``Use``, the one record of a captured use
"""
from tengrad.optim.errors import TENGraDError
from tengrad.optim.optimizer import TENGraD

__all__ = ["TENGraD", "TENGraDError"]
