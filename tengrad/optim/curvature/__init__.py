"""Curvature of one Fisher block: which parameters and uses (block.py), the rules from captured uses
to Jacobian rows (build.py), the Woodbury maths on them (woodbury.py), the Fisher's output rows
(fisher.py), the reuse-vs-explicit-J choice (paths.py), sums over several uses (uses.py), the checks
that the rows describe the gradient (consistency.py) and whether a block took part (usage.py)."""
