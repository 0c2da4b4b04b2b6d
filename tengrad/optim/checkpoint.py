"""TENGraD checkpoints: what ``state_dict`` adds, and a ``load_state_dict`` that is all or nothing.

``opt.state_dict()`` is torch's (``state``: momentum buffers by parameter index, ``param_groups``)
plus ``sd["tengrad"]``::

    steps         int, the number of steps taken (decides which steps are curvature steps)
    param_names   [str], parameter names in torch's index order (groups in order, params in order)
    param_shapes  [[int]], their shapes
    blocks        {block name: kept curvature: path, x, gy, jac, gram, chol, m, damping, requested,
                   choice, jac_split, jac_scale}  (curvature/woodbury.py; blocks without curvature are
                   absent; jac_split: the column counts of R's pieces or None, R = jac_scale * jac;
                   both optional on load: a whole R with scale 1)
    generator     the optimizer's generator state (fisher="mc") or None
    noise         the gradient-noise ratio's running sums, s and its peak (noise.py; optional: a
                  state_dict without it loads with r = 1)

``prepare`` checks everything against this optimizer before anything changes: the structure, group
count and sizes, each group's hyperparameters (options.py; an SGD state_dict has no 'damping'),
parameter names and shapes, momentum buffer shapes, block names, path kinds and every curvature
tensor's shape (x and gy through the block's own plan), the step count and the generator state.
Integrity: every tensor must be finite (momentum buffers, x, gy, J, K, the factor) and the kept
curvature self-consistent (``_consistent``): with one seeded Gaussian vector v [r] (its own generator:
no global random state is drawn),

    | L (L^T v) - (K + m a I) v |  <=  tol |K + m a I|_F |v|      the factor factors K + m a I
    | R (R^T v) - K v |            <=  tol (|K|_F + |R|_F^2) |v|  K is the Gram of the kept rows R

(tol 1e-4 in float32, 1e-10 in float64), so bytes flipped in J, x, gy, K or the factor of a saved
file are refused instead of steering training (an error far below the tolerance is one rounding
could make and changes the step as little). Price per block: two r x r triangular products and one
J^T v and J v (the plan's vjp and jvp on the kept x and gy): about a reuse step's products, once per
load (measured: a Linear(64, 64) block with r = 64 rows, 0.7-1.6 ms of a 8-11 ms ``load_state_dict``;
1 thread on the shared 2-core EPYC, noisy).
The first mismatch raises a TENGraDError naming it, and the optimizer is exactly as before.
The optimizer then commits (torch's own load, which cannot fail after these checks, and the
estimator's ``load`` of the curvature and noise statistics).
"""
from __future__ import annotations

from numbers import Integral

import torch

from tengrad.errors import TengradError
from tengrad.optim.curvature import eigenbasis, paths, woodbury
from tengrad.optim.errors import TENGraDError
from tengrad.optim.noise import NoiseScale
from tengrad.optim.options import check_group

_CURV_KEYS = ("path", "x", "gy", "jac", "gram", "chol", "m", "damping", "requested")


def _fail(msg: str) -> TENGraDError:
    return TENGraDError(f"load_state_dict: {msg}; the optimizer is unchanged")


def param_names(model, param_groups: list[dict]) -> list[str]:
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    return [names.get(id(p), "?") for g in param_groups for p in g["params"]]


def extra(steps: int, names: list[str], param_groups: list[dict], estimator_state: dict, generator,
          op_blocks: dict | None = None) -> dict:
    """The "tengrad" entry of ``opt.state_dict()`` (``estimator_state``: its kept curvature and noise;
    ``op_blocks``: what the steps' promotions built, curvature/block.py ``op_layout``)."""
    return {"steps": steps, "blocks": estimator_state["blocks"], "op_blocks": op_blocks or {}, "param_names": names,
            "param_shapes": [list(p.shape) for g in param_groups for p in g["params"]],
            "generator": None if generator is None else generator.get_state(),
            "noise": estimator_state["noise"]}


def check_rule(state_dict: object, prior: str | None, step_rule: str) -> None:
    """Refuse a state_dict saved under another step rule or prior than this optimizer's: torch's load
    would take its lr, damping and momentum into this optimizer's groups (the paper's step's lr 0.3 under
    the defaults' rule diverges). The saved ``"rule"`` entry decides; a checkpoint from before it was
    kept tells its step rule by its state: Adam's first moments ("exp_avg") only under step_rule="adam"."""
    ours = state_dict.get("tengrad") if isinstance(state_dict, dict) else None
    state = state_dict.get("state") if isinstance(state_dict, dict) else None
    if not isinstance(ours, dict) or not isinstance(state, dict):
        return                              # prepare() names what is missing
    saved = ours.get("rule")
    if isinstance(saved, dict):
        saved_prior, saved_rule = saved.get("prior"), saved.get("step_rule")
    elif ours.get("steps", 0) and state:
        saved_prior = "?"
        saved_rule = "adam" if any(isinstance(s, dict) and "exp_avg" in s for s in state.values()) else "natural"
    else:
        return
    if saved_rule != step_rule or saved_prior not in ("?", prior):
        was = f"step_rule={saved_rule!r}" + ("" if saved_prior == "?" else f", prior={saved_prior!r}")
        hint = (" (TENGraD(model)'s defaults are prior='soap', step_rule='adam' since 2026-12-08: build "
                "TENGraD(model, prior=None) to resume a run of the paper's step)") if saved_rule == "natural" else ""
        raise _fail(f"the state_dict was saved with {was}; this optimizer has step_rule={step_rule!r}, "
                    f"prior={prior!r}: build it with the saved run's settings{hint}")


def _is_int(v: object) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _tensor(c: dict, key: str, where: str, shape: tuple | None = None, dtype: torch.dtype | None = None
            ) -> torch.Tensor:
    t = c.get(key)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise _fail(f"{where}: {key!r} must be a floating-point tensor, got "
                    f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if shape is not None and tuple(t.shape) != shape:
        raise _fail(f"{where}: {key!r} has shape {tuple(t.shape)}, expected {shape}")
    if dtype is not None and t.dtype != dtype:
        raise _fail(f"{where}: {key!r} is {t.dtype}, this block computes in {dtype}")
    _finite(t, f"{where}: {key!r}")
    return t


def _finite(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise _fail(f"{what} has {bad} non-finite entr{'y' if bad == 1 else 'ies'}")


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-4


def _consistent(b, curv: woodbury.BlockCurvature, where: str) -> None:
    """The factor factors K + m a I and K is the Gram of the kept rows, on one seeded random vector
    (module docstring); raises naming the entry."""
    gram, chol = curv.gram, curv.chol
    if bool(torch.triu(chol, diagonal=1).any()) or not bool((chol.diagonal() > 0).all()):
        raise _fail(f"{where}: 'chol' is not a Cholesky factor (lower triangular, positive diagonal)")
    gen = torch.Generator(device=gram.device).manual_seed(0)
    v = torch.randn(gram.shape[0], generator=gen, dtype=gram.dtype, device=gram.device)
    tol = _tolerance(gram.dtype)
    damped = gram @ v + (curv.m * curv.damping) * v
    scale = (torch.linalg.matrix_norm(gram) + curv.m * curv.damping * gram.shape[0] ** 0.5) * v.norm()
    residual = float((chol @ (chol.T @ v) - damped).norm() / scale)
    if not residual <= tol:
        raise _fail(f"{where}: 'chol' does not factor 'gram' + m*damping*I (m={curv.m}, "
                    f"damping={curv.damping}): relative residual {residual:.3g} > {tol:g}")
    try:
        rtv = curv.rows.jtu(b.plan, v, b.params)
        rrtv = curv.rows.jg(b.plan, rtv).to(gram.dtype)
    except (TengradError, RuntimeError, ValueError, IndexError) as exc:
        raise _fail(f"{where}: the kept rows do not fit this model's layer {b.name!r}: {exc}") from None
    r_norm2 = sum(float(t.double().pow(2).sum()) for t in rtv) / max(float(v.double().pow(2).sum()), 1e-300)
    scale = (float(torch.linalg.matrix_norm(gram)) + r_norm2) * float(v.norm())
    residual = float((rrtv - gram @ v).norm()) / max(scale, 1e-300)
    if not residual <= tol:
        rows = "'jac'" if curv.path == paths.JACOBIAN else "'x' and 'gy'"
        raise _fail(f"{where}: 'gram' is not the Gram matrix of the kept rows ({rows}): relative residual "
                    f"{residual:.3g} > {tol:g}")


EIGENBASIS_KEYS = ("prior_l", "prior_r", "prior_ql", "prior_qr")


def _prior(b, s: object, where: str, dtype: torch.dtype, dev) -> tuple | None:
    """The kept prior of a block (curvature/prior.py, eigenbasis.py), one entry per parameter: a positive
    finite tensor shaped like it (S = D^-1/2), or for a weight in its eigenbasis a dict of ``q_out``
    [o, o] and ``q_in`` [n, n] (orthonormal) and ``s`` [o, n] (positive); None or absent: no prior."""
    if s is None:
        return None
    if not isinstance(s, (list, tuple)) or len(s) != len(b.params):
        raise _fail(f"{where}: 'prior' must be a list of {len(b.params)} entries (one per parameter)")
    out = []
    for k, (t, p) in enumerate(zip(s, b.params)):
        at = f"{where}, parameter {k}"
        if isinstance(t, dict):
            o, n = eigenbasis.sides(p)
            if sorted(t) != ["q_in", "q_out", "s"] or p.dim() < 2:
                raise _fail(f"{at}: an eigenbasis 'prior' is a dict of 'q_out', 'q_in' and 's' for a weight of 2 or "
                            f"more dims, got keys {sorted(t)} for shape {tuple(p.shape)}")
            q_out = _tensor(t, "q_out", at, (o, o), dtype)
            q_in = _tensor(t, "q_in", at, (n, n), dtype)
            sv = _tensor(t, "s", at, (o, n), dtype)
            for name, q in (("q_out", q_out), ("q_in", q_in)):
                eye = torch.eye(q.shape[0], dtype=q.dtype)
                if float((q.t() @ q - eye).abs().max()) > 1e3 * _tolerance(dtype):
                    raise _fail(f"{at}: 'prior' {name!r} is not orthonormal")
            if not bool((sv > 0).all()):
                raise _fail(f"{at}: 'prior' 's' (delta^-1/2) must be positive")
            out.append(eigenbasis.Rotated(q_out.to(dev).clone(), q_in.to(dev).clone(), sv.to(dev).clone()))
            continue
        t = _tensor({"prior": t}, "prior", at, tuple(p.shape), dtype)
        if not bool((t > 0).all()):
            raise _fail(f"{at}: 'prior' (D^-1/2) must be positive")
        out.append(t.to(dev).clone())
    return tuple(out)


def _curvature(b, c: object) -> tuple[woodbury.BlockCurvature, paths.PathChoice | None]:
    where = f"curvature of block {b.name!r}"
    if not isinstance(c, dict):
        raise _fail(f"{where} must be a dict, got {type(c).__name__}")
    missing = [k for k in _CURV_KEYS if k not in c]
    if missing:
        raise _fail(f"{where} has no {missing[0]!r}")
    if c["path"] not in (paths.REUSE, paths.JACOBIAN):
        raise _fail(f"{where}: unknown path kind {c['path']!r}; valid: {[paths.REUSE, paths.JACOBIAN]}")
    m = c["m"]
    if not _is_int(m) or m < 1:
        raise _fail(f"{where}: 'm' must be a positive integer, got {m!r}")
    for key in ("damping", "requested"):
        v = c[key]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 < float(v) < float("inf")):
            raise _fail(f"{where}: {key!r} must be a finite number > 0, got {v!r}")
    gram = _tensor(c, "gram", where)
    r = gram.shape[0] if gram.dim() == 2 else -1
    if gram.dim() != 2 or gram.shape[1] != r or r % m:
        raise _fail(f"{where}: 'gram' has shape {tuple(gram.shape)}, expected [r, r] with r a multiple "
                    f"of m={m}")
    chol = _tensor(c, "chol", where, (r, r))
    dev = b.params[0].device
    dtype = woodbury.compute_dtype(b.params[0].dtype)
    if gram.dtype != dtype or chol.dtype != dtype:
        raise _fail(f"{where}: curvature in {gram.dtype}, this block computes in {dtype}")
    x = gy = jac = pieces = None
    scale = 1.0
    if c["path"] == paths.JACOBIAN:
        jac = _tensor(c, "jac", where, (r, b.numel), dtype).to(dev)
        split, scale = c.get("jac_split"), c.get("jac_scale", 1.0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not (0 < float(scale) < float("inf")):
            raise _fail(f"{where}: 'jac_scale' must be a finite number > 0, got {scale!r}")
        if split is not None:
            if (not isinstance(split, (list, tuple)) or not all(_is_int(n) and n > 0 for n in split)
                    or sum(split) != b.numel):
                raise _fail(f"{where}: 'jac_split' must be column counts summing to {b.numel}, got {split!r}")
            pieces = tuple(p.clone(memory_format=torch.contiguous_format)
                           for p in torch.split(jac, list(split), dim=1))   # own copies, one pass
            jac = None
        else:
            jac = jac.clone()
    else:
        gy = _tensor(c, "gy", where, dtype=dtype).to(dev).clone()
        xs = c["x"]
        if not isinstance(xs, torch.Tensor):
            raise _fail(f"{where}: 'x' must be a tensor, got {type(xs).__name__}")
        if xs.is_floating_point() and xs.dtype != dtype:
            raise _fail(f"{where}: 'x' is {xs.dtype}, this block computes in {dtype}")
        _finite(xs, f"{where}: 'x'")
        x = xs.to(dev).clone()
        if gy.dim() == 0 or gy.shape[0] != r or x.dim() == 0 or x.shape[0] != r:
            raise _fail(f"{where}: x {tuple(x.shape)} and gy {tuple(gy.shape)} need {r} rows (the Gram is "
                        f"{r} x {r})")
        try:   # the block's own plan checks x and gy against this model's layer
            zeros = [torch.zeros_like(p, dtype=gy.dtype) for p in b.params]
            b.plan.jvp(x, gy, zeros)
        except (TengradError, RuntimeError, ValueError, IndexError) as exc:   # the plan refused them
            raise _fail(f"{where} does not fit this model's layer {b.name!r}: {exc}") from None
    choice = c.get("choice")
    if choice is not None:
        if (not isinstance(choice, (tuple, list)) or len(choice) != 2
                or choice[0] not in (paths.REUSE, paths.JACOBIAN) or not isinstance(choice[1], str)):
            raise _fail(f"{where}: 'choice' must be (path, note), got {choice!r}")
        choice = paths.PathChoice(choice[0], choice[1])
    rows = woodbury.Rows(c["path"], int(m), x, gy, jac, pieces, float(scale))
    rows.prior = _prior(b, c.get("prior"), where, dtype, dev)
    mean = c.get("prior_mean")          # the block's mean sqrt(v) behind the prior (step_rule="adam")
    if mean is not None:
        if not isinstance(mean, torch.Tensor) or mean.numel() != 1 or not bool(mean > 0) \
                or not bool(torch.isfinite(mean)):
            raise _fail(f"{where}: 'prior_mean' must be a positive finite scalar tensor, got {mean!r}")
        rows.prior_mean = mean.to(device=dev, dtype=dtype).clone()
    tokens = c.get("tokens")            # rows per position (curvature/tokens.py): T, or None for sample rows
    if tokens is not None and (not _is_int(tokens) or tokens < 2):
        raise _fail(f"{where}: 'tokens' must be None or the positions per sample (an integer >= 2), got {tokens!r}")
    rows.tokens = None if tokens is None else int(tokens)
    curv = woodbury.BlockCurvature(rows, gram.to(dev).clone(), chol.to(dev).clone(), float(c["damping"]),
                                   float(c["requested"]))
    _consistent(b, curv, where)
    return curv, choice


def prepare(state_dict: object, param_groups: list[dict], names: list[str], known_blocks: list, generator
            ) -> tuple[dict, dict]:
    """(torch's part of the state_dict, our prepared part), checked against the optimizer's groups,
    parameter names, blocks and generator; raises before anything changes."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise _fail(f"expected an optimizer state_dict with 'state' and 'param_groups', got "
                    f"{type(state_dict).__name__}" + (f" with keys {sorted(map(str, state_dict))[:6]}"
                                                      if isinstance(state_dict, dict) else ""))
    saved_groups, state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, (list, tuple)) or not isinstance(state, dict):
        raise _fail("'param_groups' must be a list and 'state' a dict")
    if len(saved_groups) != len(param_groups):
        raise _fail(f"the state_dict has {len(saved_groups)} param group(s), this optimizer "
                    f"{len(param_groups)}")
    index_to_param = {}
    for i, (sg, g) in enumerate(zip(saved_groups, param_groups)):
        if not isinstance(sg, dict) or not isinstance(sg.get("params"), (list, tuple)):
            raise _fail(f"param_groups[{i}] must be a dict with a 'params' list")
        if len(sg["params"]) != len(g["params"]):
            raise _fail(f"param_groups[{i}] has {len(sg['params'])} parameters in the state_dict, "
                        f"{len(g['params'])} here")
        try:
            check_group(sg, i)
        except TENGraDError as exc:
            raise _fail(f"{exc} (is this a TENGraD state_dict?)") from None
        index_to_param.update(zip(sg["params"], g["params"]))
    ours = state_dict.get("tengrad")
    if not isinstance(ours, dict):
        raise _fail("the state_dict has no 'tengrad' entry: it was not saved by TENGraD")
    steps = ours.get("steps")
    if not _is_int(steps) or steps < 0:
        raise _fail(f"'steps' must be an integer >= 0, got {steps!r}")
    shapes = [tuple(p.shape) for g in param_groups for p in g["params"]]
    saved_names, saved_shapes = ours.get("param_names"), ours.get("param_shapes")
    if saved_names is not None:
        for k, (a, b) in enumerate(zip(saved_names, names)):
            if a != b:
                raise _fail(f"parameter {k} is {a!r} in the state_dict but {b!r} here")
    if saved_shapes is not None:
        for k, (a, b) in enumerate(zip(saved_shapes, shapes)):
            if tuple(a) != b:
                raise _fail(f"parameter {k} ({names[k]!r}) has shape {tuple(a)} in the state_dict, {b} here")
    name_of = dict(zip((id(p) for g in param_groups for p in g["params"]), names))
    for idx, s in state.items():
        if idx not in index_to_param:
            raise _fail(f"'state' has an entry for parameter index {idx!r}, which no group lists")
        p = index_to_param[idx]
        where = f"state of parameter {name_of[id(p)]!r}"
        if not isinstance(s, dict):
            raise _fail(f"{where} must be a dict")
        unknown = [k for k in s if k not in ("momentum_buffer", "prior_v", "exp_avg", "exp_avg_steps",
                                             eigenbasis.ROTATE) + EIGENBASIS_KEYS]
        if unknown:
            raise _fail(f"{where} has unexpected key {unknown[0]!r} (TENGraD keeps only 'momentum_buffer' "
                        "and, with a prior, 'prior_v' and, in an eigenbasis, 'prior_l', 'prior_r', 'prior_ql', "
                        "'prior_qr' and 'prior_rotate'; with step_rule='adam', 'exp_avg' and 'exp_avg_steps')")
        if eigenbasis.ROTATE in s:          # prior="soap"'s decision (eigenbasis.decide)
            if not isinstance(s[eigenbasis.ROTATE], bool) or not eigenbasis.rotatable(p):
                raise _fail(f"{where}: 'prior_rotate' is a bool, kept for a weight of 2 or more dims, got "
                            f"{s[eigenbasis.ROTATE]!r}")
            if not s[eigenbasis.ROTATE] and any(k in s for k in EIGENBASIS_KEYS):
                raise _fail(f"{where}: 'prior_rotate' is False but the state holds an eigenbasis")
        if ("exp_avg" in s) != ("exp_avg_steps" in s):
            raise _fail(f"{where}: 'exp_avg' and 'exp_avg_steps' (step_rule='adam') come together")
        if "exp_avg" in s:
            _tensor(s, "exp_avg", where, tuple(p.shape))
            if not _is_int(s["exp_avg_steps"]) or s["exp_avg_steps"] < 1:
                raise _fail(f"{where}: 'exp_avg_steps' must be an integer >= 1, got {s['exp_avg_steps']!r}")
        if any(k in s for k in EIGENBASIS_KEYS):    # prior="soap" (curvature/eigenbasis.py)
            o, n = eigenbasis.sides(p)
            if p.dim() < 2 or not all(k in s for k in EIGENBASIS_KEYS + ("prior_v",)):
                raise _fail(f"{where}: an eigenbasis state has all of 'prior_l', 'prior_r', 'prior_ql', 'prior_qr' "
                            "and 'prior_v', for a weight of 2 or more dims")
            for k, shape in zip(EIGENBASIS_KEYS, ((o, o), (n, n), (o, o), (n, n))):
                _tensor(s, k, where, shape)
        if "momentum_buffer" in s:
            _tensor(s, "momentum_buffer", where, tuple(p.shape))
        if "prior_v" in s:          # Adam's second moments of the prior (curvature/prior.py): >= 0
            if not bool((_tensor(s, "prior_v", where, tuple(p.shape)) >= 0).all()):
                raise _fail(f"{where}: 'prior_v' (second moments) has negative entries")
    blocks = ours.get("blocks", {})
    if not isinstance(blocks, dict):
        raise _fail("'blocks' must be a dict of block name -> curvature")
    by_name = {b.name: b for b in known_blocks}
    prepared = {}
    for name, c in blocks.items():
        if name not in by_name:
            raise _fail(f"the state_dict has curvature for layer {name!r}, which this model lacks "
                        f"(blocks: {list(by_name)})")
        prepared[name] = _curvature(by_name[name], c)
    gen = ours.get("generator")
    if gen is not None and generator is not None:
        try:
            torch.Generator(device=generator.device).set_state(gen)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise _fail(f"the generator state does not fit this optimizer's generator: {exc}") from None
    # Momentum buffers are cloned: torch's load_state_dict keeps the given tensors when dtype and
    # device already match, so an optimizer loaded from another's in-memory state_dict would share
    # (and step twice) its buffers.
    base = {k: v for k, v in state_dict.items() if k != "tengrad"}
    base["state"] = {idx: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                     for idx, s in state.items()}
    noise = ours.get("noise")          # absent in state_dicts without noise statistics: r = 1
    if noise is not None:
        why = NoiseScale.check(noise)
        if why is not None:
            raise _fail(f"'noise' (the gradient-noise scale, noise.py) {why}")
    shapes = ours.get("jacobian_grad", {})     # absent in older state_dicts: none
    if not isinstance(shapes, dict) or not all(
            isinstance(v, (list, tuple)) and all(_is_int(d) and d >= 0 for d in v) for v in shapes.values()):
        raise _fail("'jacobian_grad' must map block names to input shapes (lists of integers >= 0)")
    jacobian_grad = {name: tuple(int(d) for d in v) for name, v in shapes.items() if name in by_name}
    return base, {"steps": int(steps), "curv": prepared, "generator": gen, "noise": noise,
                  "jacobian_grad": jacobian_grad}
