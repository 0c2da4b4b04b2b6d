"""The memory budget of a curvature step: which form each block keeps, and how many rows.

A block keeps its rows R [r, P] between curvature steps either as the explicit Jacobian J or as the
layer's input and output gradients x, gy (paths.py). Per block b due this step, from the sizes of its
captured uses alone, before anything is formed (build.py ``forms``; s bytes per element):

    J_b   = r_b P_b s                   the explicit Jacobian
    X_b   = (|x_b| + |gy_b|) s          x and gy; none for a J summed over several uses (uses.py)
    kept  = sum_b (J_b if b keeps J else X_b)  +  what the blocks not due this step keep

(K and its factor, r^2 each, are left out). Within a budget B (``fit``):

1. each block takes the form the time model prices cheaper (paths.py: flops and the bytes each step
   reads, roofline.py);
2. ``curvature_batch="auto"``: as many rows as B allows with every block in its smaller form (a J may
   move to x and gy): c = max(1, floor(M B / low)) of the M rows when low, those bytes at M rows, is
   over B (both forms are linear in the rows); the same rows for every block (estimator/local.py);
   the step is then the exact damped step of the Fisher of those rows;
   and, for time, at most c_t rows (``time_rows``): a reuse step's J g and J^T u over all blocks, priced
   by the roofline in the form each keeps at the c rows the memory left (c = M when it cut none;
   paths.py ``step_seconds``: S(c), linear in the rows), at most TIME_SHARE (0.07) of the layers'
   forward and backward, 3 x their forwards F:
   c_t = max(MIN_ROWS, floor(c TIME_SHARE 3F / S(c))) when S(c) > TIME_SHARE 3F (issue 23: a reuse
   step <= 1.15x SGD's; the rest of a reuse step, the solve, the stacks, <d, g>, the took-part check
   and Python, measured 5-8% of SGD's step on ViT-tiny and the ResNet-18 layout at 2 threads, takes the
   other 8%: at 0.1 ViT-tiny's reuse step stayed at 1.19x, ResNet's at 1.15x). The forward and backward are
   those of the blocks' layers only (attention scores, norms and activations are not in it), so c_t errs
   on the small side. A reuse step priced under TIME_FLOOR (1 ms) is never cut: there the per-block
   overheads, not the products, are the cost, and small models stay exact;
3. while kept > B at those rows, the block whose move from J to x and gy saves the most bytes moves
   (only moves that save bytes; a move costs reuse-step time, so none that the rows made unneeded;
   a moved block stays on x and gy at later steps, ``Block.memory_reuse``).

B is ``curvature_memory`` bytes, or for ``"auto"`` (the default)

    B = max(FLOOR, SHARE * T - D)
    T = |gradients| + |momentum buffers| + sum over this step's captured layer inputs |x| (each storage once)
    D = |parameters|          (the step's direction d, formed once per step beside the kept curvature)

so that TENGraD's extra memory, the kept curvature and the direction, is at most SHARE of T. T is the
model's training memory beyond its parameters as a step can see it (what SGD with momentum holds:
gradients, its buffer and the activations autograd saves, of which each captured layer's input, kept
for its weight gradient, is one): a lower bound (the outputs other ops keep, attention's scores, the
loss's log-probabilities are not in it), so B errs on the small side. Counting the layers' outputs
too (as large as their captured gradients) was tried: it gives the GPT-like LM of benchmarks/zoo 4
rows of 8 instead of 1, but 3C1F-128 and the 4096 MLP then peak at 0.52-0.53x SGD's working memory,
over issue 23's 0.5x (benchmarks/README.md). FLOOR
(16 MiB) leaves small models alone: below it nothing is moved and no row is dropped. With a given
``curvature_batch`` c the byte counts are those of min(c, m) rows and no further rows are dropped.
"""
from __future__ import annotations

import math
from dataclasses import replace

from tengrad.optim.curvature import build, memory, paths

SHARE = 0.5             # TENGraD's kept curvature at most this share of T (issue 23)
FLOOR = 16 * 2 ** 20    # auto budget: never below this many bytes (small models stay exact)
TIME_SHARE = 0.07       # auto rows: a reuse step's products at most this share of the forward and backward
MIN_ROWS = 2            # ... but never fewer rows than this for time (the memory cap may go lower; ViT-tiny takes 3)
TIME_FLOOR = 1e-3       # ... and no cut for a reuse step priced under this many seconds (small models stay exact)
AUTO = "auto"


def training_bytes(step, due_uses: dict) -> tuple[int, int]:
    """(T, D) of this step (module docstring): T = gradients + momentum buffers + the captured layer
    inputs (each storage once), D = the direction's bytes (one per trainable parameter)."""
    seen, total, direction = set(), 0, 0
    for g in step.groups:
        for p in g["params"]:
            if p.requires_grad:
                n = p.numel() * p.element_size()
                direction += n
                total += n * (2 if g["momentum"] else 1)
    for uses in due_uses.values():
        for u in uses:
            if u.x is None:
                continue
            key = (u.x.untyped_storage().data_ptr(), u.x.device)
            if key not in seen:
                seen.add(key)
                total += u.x.untyped_storage().nbytes()
    return total, direction


def budget_of(step, due_uses: dict) -> int | None:
    """B in bytes for this step, or None (``curvature_memory=None``: no budget)."""
    cap = step.rules.curvature_memory
    if cap is None or cap != AUTO:
        return cap
    total, direction = training_bytes(step, due_uses)
    return max(FLOOR, int(SHARE * total) - direction)


def _under_prior(b, form: tuple[str, int, int | None, int], rules) -> tuple[str, int, int | None, int]:
    """A block's form as its prior keeps it: a prior that rotates or scales J per entry (prior.py
    ``needs_jacobian``) forms the explicit J whatever the time model chose for the plain rows, within
    max_jacobian_numel; moving it to x and gy (``Block.memory_reuse``) then means the identity prior."""
    path, j_bytes, x_bytes, m = form
    prior = rules.prior
    if (prior is None or path == paths.JACOBIAN or x_bytes is None or b.memory_reuse
            or not prior.needs_jacobian(b)):
        return form
    s = max(b.params[0].element_size() if b.params else 4, 4)     # J bytes = r P s, s the compute dtype's
    return (paths.JACOBIAN, j_bytes, x_bytes, m) if j_bytes // s <= rules.max_jacobian_numel else form


def fit(forms: dict[int, tuple[str, int, int | None, int]], cap: int, rows: int | str | None,
        other: int = 0) -> tuple[list[int], int | None, int]:
    """(blocks to move from J to x and gy, the rows c to sample or None, the kept bytes then) for
    ``forms`` {i: (path, J bytes, x-and-gy bytes or None, m)} at the step's full rows; ``rows``: a given
    curvature batch (int: byte counts of min(c, m) rows), "auto" or None (all rows); ``other``: bytes
    kept by blocks not due this step.

    Rows first, as many as the budget allows: with "auto", c = max(1, floor(M (cap - other) / low)),
    low = the kept bytes with every block in its smaller reachable form (a J may move to x and gy; x
    and gy stay), when that is over the budget. Then, at those rows, the fewest moves: the largest
    saving first until the kept bytes fit (a move costs reuse-step time, paths.py, so none is made
    that the rows already made unnecessary)."""
    given = rows if isinstance(rows, int) else None
    part = {i: (min(1.0, given / f[3]) if given is not None and f[3] else 1.0) for i, f in forms.items()}

    def held(f) -> int:
        return f[1] if f[0] == paths.JACOBIAN else f[2]

    c, frac = None, 1.0
    if rows == AUTO and forms:
        m = max(f[3] for f in forms.values())
        low = sum(min(f[1], f[2]) if f[0] == paths.JACOBIAN and f[2] is not None else held(f)
                  for f in forms.values())
        if other + low > cap and low > 0:
            c = max(1, math.floor(m * max(0, cap - other) / low))
            if c >= m:
                c = None
            else:
                frac = c / m
    kept = other + sum(math.ceil(frac * part[i] * held(f)) for i, f in forms.items())
    options = sorted(((frac * part[i] * (f[1] - f[2]), i) for i, f in forms.items()
                      if f[0] == paths.JACOBIAN and f[2] is not None and f[2] < f[1]), reverse=True)
    moved = []
    for saving, i in options:
        if kept <= cap:
            break
        moved.append(i)
        kept -= int(saving)
    return moved, c, kept


def step_rules(step, due_uses: dict):
    """(the rules this step builds its rows with, one line for ``explain()`` or None): build.py ``Rules``
    with the forms moved within the budget (``Block.memory_reuse`` set on the moved blocks) and
    ``curvature_batch`` the rows to sample (None: all). ``due_uses``: {block index: its captured uses}
    of the blocks due this step."""
    rules = step.rules
    rows = rules.curvature_batch
    fixed = replace(rules, curvature_batch=None if rows == AUTO else rows)
    if not due_uses:                # a reuse step: nothing is formed, no budget to work out
        return fixed, None
    cap = budget_of(step, due_uses)
    if cap is None:
        return fixed, None
    forms = {i: _under_prior(step.blocks[i], build.forms(step.blocks[i], uses, fixed), fixed)
             for i, uses in due_uses.items()}
    other = sum(memory.kept_bytes(b.curv.rows) for i, b in enumerate(step.blocks)
                if i not in due_uses and b.curv is not None and b.curv.rows is not None)
    m = max(f[3] for f in forms.values())
    moved, c, kept = fit(forms, cap, rows, other)
    cut = "fit" if c is not None else None
    timed = None
    if rows == AUTO:                # the time rule, at the rows and forms the memory left
        secs = {i: build.seconds(step.blocks[i], uses, fixed) for i, uses in due_uses.items()}
        before = c if c is not None else m
        timed = time_rows(secs, {i: f[0] if i not in moved else paths.REUSE for i, f in forms.items()}, before, m)
        if timed is not None:       # fewer rows for time: the moves they still need (perhaps none)
            moved, _, kept = fit(forms, cap, timed[0], other)
            c, cut = timed[0], "time"
    for i in moved:                 # sticky: its J is not formed again (build.py ``_choice``)
        step.blocks[i].memory_reuse = True
    why = {None: "", "fit": " (cut to fit: curvature_batch='auto')",
           "time": f" (cut for time: curvature_batch='auto'; {before} rows priced at {timed[1] * 1e3:.3g} ms a "
                   f"reuse step against ~{timed[2] * 1e3:.3g} ms for the layers' forward and backward)"
           if timed is not None else ""}[cut]
    line = (f"  memory budget (curvature/budget.py): {cap / 2 ** 20:.1f} MB "
            f"({'curvature_memory=' + str(rules.curvature_memory) if rules.curvature_memory != AUTO else 'auto'}); "
            f"kept {kept / 2 ** 20:.1f} MB; {sum(1 for b in step.blocks if b.memory_reuse)} block(s) on x and gy "
            f"for it; last curvature step: {c if c is not None else min(m, rows) if isinstance(rows, int) else m} "
            f"of {m} rows" + why)
    return (fixed if c is None else replace(fixed, curvature_batch=c)), line


def time_rows(secs: dict, paths_of: dict, c: int, m: int) -> tuple[int, float, float] | None:
    """The time rule of ``curvature_batch="auto"`` (module docstring): (fewer rows c_t, the reuse step's
    seconds at c rows of m, the forward and backward's) when a reuse step at c rows would cost more than
    TIME_SHARE of the layers' forward and backward and more than TIME_FLOOR, else None.
    ``secs``: {i: paths.StepSeconds or None} of the due blocks at all m rows (None: not priced, no
    roofline); ``paths_of``: {i: the path each keeps at c rows}."""
    if not secs or any(v is None for v in secs.values()) or c <= MIN_ROWS:
        return None
    step = c / m * sum(secs[i].reuse if paths_of[i] == paths.REUSE and secs[i].reuse is not None
                       else secs[i].jacobian for i in secs)
    train = 3.0 * sum(v.forward for v in secs.values())
    if step <= max(TIME_SHARE * train, TIME_FLOOR):
        return None
    t = max(MIN_ROWS, math.floor(c * TIME_SHARE * train / step))
    return (t, step, train) if t < c else None
