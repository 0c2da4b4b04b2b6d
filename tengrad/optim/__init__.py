"""TENGraD: exact per-layer (block-diagonal) natural gradient through the Woodbury identity.

The paper's update (equation 4), per Fisher block (one module's trainable parameters), with m samples::

    d = (F + a I)^-1 g = (1/a) (g - J^T (K + m a I)^-1 J g),     F = J^T J / m,  K = J J^T

Files, one concept each:

    capture.py    hooks keeping each layer's input x and per-sample output gradient gy
    op_capture.py the same at the ops that read parameters (a TorchFunctionMode in captured forwards)
    hookset.py    the capture hooks switched off on reuse steps and on again in their old place
    fisher.py     losses, Monte-Carlo labels and exact Gauss-Newton rows (which gy rows J is built from)
    woodbury.py   the per-block curvature: K, its Cholesky factor, and the direction d
    paths.py      per-layer choice between keeping x/gy ("reuse") and an explicit Jacobian
    blocks.py     finding the blocks of a model (tengrad.compile per module)
    hyperparams.py  the rules for every hyperparameter (construction, each step, checkpoints)
    groups.py     param groups: which lr, damping, momentum, weight decay each block uses
    usage.py      which blocks took part in this step's forward (the others are skipped)
    checkpoint.py state_dict's extra entry and an all-or-nothing load_state_dict
    report.py     the fallback warning, one line per layer type
    optimizer.py  the TENGraD torch.optim.Optimizer
    distributed*.py  data-parallel steps on torch.distributed ("exact" global batch, "local"):
                  the strategy, exchange/owner planning, rows, gradient reduction, collectives
"""
from tengrad.optim.errors import TENGraDError
from tengrad.optim.optimizer import TENGraD

__all__ = ["TENGraD", "TENGraDError"]
