"""What each rank runs in tests/test_optim_distributed.py (several checks per spawned group: torch imports cost
seconds per process). Every check returns plain data; the test asserts on it in the parent.

References, never the code under test: the dense float64 oracle of tests/support/step_oracle.py
(per-sample gradients from torch.func, F = dense, d = solve(F_b + a I, g_b)) on the *global* batch, and a
single-process TENGraD (distributed=None) on the global batch where momentum/weight decay are involved.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tengrad.optim import TENGraD, TENGraDError
from .dist_harness import Phase
from .numerics import rel_err
from .optim_cases import LOSSES
from tengrad.optim.curvature import eigenbasis
from .step_oracle import dense_directions, expected_steps, kept_prior_matrix, oracle_fisher, per_sample_grads


class MixNet(nn.Module):
    """Grouped Conv2d -> a sequence; Embedding of ids derived from the input; LayerNorm; Linear on the
    sequence; PReLU (no plan: fallback); Linear head. Input x [m, 4, 5, 5] (float)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.emb = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)
        self.lin = nn.Linear(6, 5)
        self.act = nn.PReLU()
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        # T = 9 positions: no batch size of these tests is 9, so the sample dimension is never ambiguous
        ids = torch.remainder(torch.floor(x[:, 0].flatten(1)[:, :9] * 7), 10).long()   # [m, 9]
        h = torch.tanh(self.conv(x)).flatten(2).transpose(1, 2)[:, :9]            # [m, 9, 6]
        h = self.lin(self.norm(h + self.emb(ids)))                                 # [m, 9, 5]
        return self.head(self.act(h).mean(1))                                      # [m, 3]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MixNet().to(torch.float64)


def global_batch(gen, m: int, loss: str):
    x = torch.randn(m, 4, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (m,), generator=gen) if loss == "cross_entropy" else \
        torch.randn(m, 3, generator=gen, dtype=torch.float64)
    return x, y


def _slice(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _identical_everywhere(model) -> bool:
    """True when this rank's parameters equal rank 0's bit for bit (all ranks agree on the answer)."""
    mine = _flat_params(model)
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    same = torch.tensor([float(torch.equal(mine, ref))], dtype=torch.float64)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item() == 1.0)


def _gather_labels(labels: torch.Tensor | None):
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, labels)
    return torch.cat(parts) if parts[0] is not None else None


def _view(opt, prefix: str):
    """opt's blocks/fallback with a DDP prefix stripped, for expected_steps on the inner model."""
    strip = (lambda n: n[len(prefix):] if n.startswith(prefix) else n)
    blocks = [SimpleNamespace(param_names=[strip(n) for n in b.param_names]) for b in opt.blocks]
    return SimpleNamespace(blocks=blocks, fallback=[(strip(n), p) for n, p in opt.fallback])


def _make_opt(model, mode, fisher, k, seed, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw.setdefault("kl_clip", None)   # the exact step (KL clipping is on by default since issue 11)
        kw.setdefault("prior", None)     # the paper's step, D = I (the defaults take prior="soap")
        kw.setdefault("step_rule", "natural")
        return TENGraD(model, kw.pop("lr", 0.3), kw.pop("damping", 0.5), momentum=kw.pop("momentum", 0.0),
                       update_freq=k, fisher=fisher, generator=torch.Generator().manual_seed(seed),
                       distributed=mode, **kw)


def _backward(opt, out, y, fisher, loss, step):
    opt.zero_grad()
    if fisher == "empirical" and step % 2 == 0:
        LOSSES[loss](out, y).backward()
    else:
        opt.backward(out, y, loss=loss)


def _accumulate(net, x, y, micro: int, ddp: bool) -> None:
    """Gradient accumulation on this rank: its batch in ``micro`` uneven micro-batches (the first the
    largest), (loss * m_j / M_r).backward() each, all but the last under DDP's ``no_sync()``."""
    M_r = x.shape[0]
    parts = [M_r // micro] * micro
    parts[0] += M_r % micro
    if len(set(parts)) == 1 and parts[-1] > 1:
        parts[0], parts[-1] = parts[0] + 1, parts[-1] - 1
    cuts = [sum(parts[:j]) for j in range(micro + 1)]
    for j in range(micro):
        xb, yb = x[cuts[j]:cuts[j + 1]], y[cuts[j]:cuts[j + 1]]
        with net.no_sync() if ddp and j < micro - 1 else contextlib.nullcontext():
            (F.cross_entropy(net(xb), yb) * (xb.shape[0] / M_r)).backward()


def check_exact(rank, world, fisher="empirical", loss="cross_entropy", k=1, ddp=False, sizes=None,
                lr=0.3, damping=0.5, micro=1):
    """Steps of distributed="exact" against the dense oracle on the global batch (momentum 0); with
    ``micro`` > 1 (empirical, cross-entropy) each rank accumulates its batch over that many micro-batches
    (``_accumulate``): the oracle's batch is then the union of every rank's micro-batches."""
    model = make_model()
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = _make_opt(net, "exact", fisher, k, seed=100 + rank, lr=lr, damping=damping)
    view = _view(opt, "module.")
    gen = torch.Generator().manual_seed(1)
    worst, identical, F_stored, names = 0.0, True, None, None
    for s, step_sizes in enumerate(sizes):
        x, y = global_batch(gen, sum(step_sizes), loss)
        sl = _slice(step_sizes, rank)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        g = {n: t.mean(0) for n, t in per_sample_grads(model, x, y, loss).items()} if rank == 0 else None
        if micro > 1:
            opt.zero_grad()
            _accumulate(net, x[sl], y[sl], micro, ddp)
        else:
            _backward(opt, net(x[sl]), y[sl], fisher, loss, s)
        labels = _gather_labels(opt.last_labels) if fisher == "mc" and s % k == 0 else None
        if rank == 0 and s % k == 0:
            F_stored, names = oracle_fisher(model, x, y, fisher, loss, labels=labels)
        opt.step()
        if rank == 0:
            exp = expected_steps(view, model, F_stored, names, g, lr, damping)
            for n, p in model.named_parameters():
                worst = max(worst, rel_err(p.detach() - before[n], exp[n]))
        identical &= _identical_everywhere(model)
    text = opt.explain()
    return dict(worst=worst, identical=identical, explain=text)


class Deeper(MixNet):
    """MixNet with one more Linear: a rank that builds another depth."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(3, 3)

    def forward(self, x):
        return self.extra(super().forward(x))


def check_agreement(rank, world):
    """Ranks that disagree (estimator/agreement.py): each case returns, per rank, the error raised (type
    and text) and whether parameters and step count stayed as they were."""
    out = {}

    def attempt(name, build, spoil=None, batch=4):
        try:
            model, opt = build()
        except TENGraDError as err:
            out[name] = dict(where="construction", error=type(err).__name__, text=str(err), unchanged=True)
            return
        x, y = global_batch(torch.Generator().manual_seed(7), 4, "cross_entropy")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()                                       # one agreed step first
        if spoil is not None:
            spoil(model, opt)
        x, y = global_batch(torch.Generator().manual_seed(8), 4, "cross_entropy")
        if rank == 1:
            x, y = x[:batch], y[:batch]
        before = _flat_params(model).clone()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        try:
            opt.step()
            out[name] = dict(where=None, error=None, text="", unchanged=None)
        except TENGraDError as err:
            out[name] = dict(where="step", error=type(err).__name__, text=str(err),
                             unchanged=torch.equal(before, _flat_params(model)) and opt._steps == 1)

    def same_seed():
        model = make_model(0)
        return model, _make_opt(model, "exact", "empirical", 1, seed=0)

    def own_seed():
        model = make_model(rank)
        return model, _make_opt(model, "exact", "empirical", 1, seed=0)

    def own_depth():
        torch.manual_seed(0)
        model = (Deeper() if rank == 1 else MixNet()).to(torch.float64)
        return model, _make_opt(model, "exact", "empirical", 1, seed=0)

    def lr_on_rank_1(model, opt):
        if rank == 1:
            opt.param_groups[0]["lr"] = 0.1

    attempt("different seeds", own_seed)
    attempt("different depths", own_depth)
    attempt("lr changed on one rank", same_seed, lr_on_rank_1)
    attempt("empty rank", same_seed, batch=0)
    attempt("agreeing ranks", same_seed)
    return out


def check_dead_peer(rank, world):
    """The last rank leaves its process group (its sockets close, as a killed process's do) before the
    step; the others raise PeerError, not hang, within the group's timeout."""
    import time

    model = make_model()
    opt = _make_opt(model, "exact", "empirical", 1, seed=0)
    x, y = global_batch(torch.Generator().manual_seed(0), 4, "cross_entropy")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if rank == world - 1:
        dist.destroy_process_group()
        return dict(raised=None, seconds=0.0, error="")
    t0 = time.monotonic()
    try:
        opt.step()
    except Exception as err:   # noqa: BLE001 - the type is what the test checks
        return dict(raised=True, seconds=time.monotonic() - t0, error=f"{type(err).__name__}: {err}"[:300])
    return dict(raised=False, seconds=time.monotonic() - t0, error="")


def _groups(model):
    """Two param groups: the conv and the embedding with their own lr, damping and weight decay."""
    return [{"params": [model.conv.weight, model.conv.bias, model.emb.weight], "lr": 0.1, "damping": 0.8,
             "weight_decay": 0.0}]


def check_single_process(rank, world, sizes, k=3, ddp=False, fisher="exact", loss="cross_entropy",
                         param_groups=False):
    """distributed="exact" with momentum, weight decay and a damping change against a single-process
    TENGraD on the global batch (every rank runs both; parameters must agree to 1e-8 and be identical
    across ranks)."""
    model, ref_model = make_model(), make_model()
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    kw = dict(lr=0.2, damping=0.3, momentum=0.9, weight_decay=1e-2)
    opt = _make_opt(net, "exact", fisher, k, seed=7, **kw,
                    **({"param_groups": _groups(model)} if param_groups else {}))
    ref = _make_opt(ref_model, None, fisher, k, seed=7, **dict(kw),
                    **({"param_groups": _groups(ref_model)} if param_groups else {}))
    gen = torch.Generator().manual_seed(3)
    worst, identical = 0.0, True
    for s, step_sizes in enumerate(sizes):
        if s == 2:      # a damping change on a reuse step: the owners refactor their kept K
            for o in (opt, ref):
                o.param_groups[-1]["damping"] = 0.6
        x, y = global_batch(gen, sum(step_sizes), loss)
        sl = _slice(step_sizes, rank)
        _backward(ref, ref_model(x), y, fisher, loss, s)
        ref.step()
        _backward(opt, net(x[sl]), y[sl], fisher, loss, s)
        opt.step()
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
            worst = max(worst, rel_err(p.detach(), q.detach()))
        identical &= _identical_everywhere(model)
    return dict(worst=worst, identical=identical)


def check_local(rank, world, sizes, k=1, fisher="empirical", loss="cross_entropy", lr=0.3, damping=0.5):
    """distributed="local": bit-identical parameters; the change equals -lr mean_r (F_r + a I)^-1 g with
    F_r the oracle Fisher of rank r's batch and g the global gradient."""
    model = make_model()
    opt = _make_opt(model, "local", fisher, k, seed=100 + rank, lr=lr, damping=damping)
    gen = torch.Generator().manual_seed(5)
    worst, identical, F_r, names = 0.0, True, None, None
    for s, step_sizes in enumerate(sizes):
        x, y = global_batch(gen, sum(step_sizes), loss)
        sl = _slice(step_sizes, rank)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        g = {n: t.mean(0) for n, t in per_sample_grads(model, x, y, loss).items()}
        _backward(opt, model(x[sl]), y[sl], fisher, loss, s)
        if s % k == 0:
            F_r, names = oracle_fisher(model, x[sl], y[sl], fisher, loss, labels=opt.last_labels)
        opt.step()
        exp = expected_steps(opt, model, F_r, names, g, lr, damping)
        for n in exp:
            dist.all_reduce(exp[n])
            exp[n] /= world
        for n, p in model.named_parameters():
            worst = max(worst, rel_err(p.detach() - before[n], exp[n]))
        identical &= _identical_everywhere(model)
    return dict(worst=worst, identical=identical, explain=opt.explain())


def check_failures(rank, world, ddp=False):
    """Failures on one rank make every rank raise the same error at the same step, nothing moves."""
    model = make_model()
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = _make_opt(net, "exact", "empirical", 1, seed=0, momentum=0.9)
    gen = torch.Generator().manual_seed(9)
    report = {}

    def attempt(name, spoil=None):
        x, y = global_batch(gen, 2 * world, "cross_entropy")
        sl = slice(2 * rank, 2 * rank + 2)
        opt.zero_grad()
        F.cross_entropy(net(x[sl]), y[sl]).backward()
        if spoil is not None and rank == world - 1:
            spoil()
        before = _flat_params(model).clone()
        try:
            opt.step()
            message = None
        except TENGraDError as err:
            message = str(err)
        unchanged = torch.equal(before, _flat_params(model))
        messages = [None] * world
        dist.all_gather_object(messages, message)
        report[name] = dict(messages=messages, unchanged=unchanged, identical=_identical_everywhere(model))

    attempt("ok-before")
    attempt("nan-grad", spoil=lambda: model.lin.weight.grad.view(-1)[0].fill_(float("nan")))
    # a second call of one layer in the captured step (as a weight shared across forwards or gradients
    # accumulated over two passes leave it): its capture holds two records, which take() refuses
    lin = next(b for b in opt.blocks if b.name.endswith("lin")).capture
    attempt("capture", spoil=lambda: lin._received.append(lin._received[0]))
    from tengrad.optim.curvature import woodbury
    real = woodbury.factor

    def broken(gram, m, damping, layer):
        raise TENGraDError(f"layer {layer!r}: Cholesky of K + m*damping*I failed (injected on rank {rank})")

    if rank == world - 1:
        woodbury.factor = broken
    try:
        attempt("cholesky")
    finally:
        woodbury.factor = real
    attempt("ok-after")
    return report


def check_checkpoint(rank, world, sizes, k=3):
    """rank 0's state_dict restores every rank; training then matches a single process that loaded it."""
    model = make_model()
    kw = dict(lr=0.2, damping=0.3, momentum=0.9)
    opt = _make_opt(model, "exact", "empirical", k, seed=0, **kw)
    gen = torch.Generator().manual_seed(11)
    for s, step_sizes in enumerate(sizes[:2]):
        x, y = global_batch(gen, sum(step_sizes), "cross_entropy")
        sl = _slice(step_sizes, rank)
        _backward(opt, model(x[sl]), y[sl], "empirical", "cross_entropy", s)
        opt.step()
    box = [(model.state_dict(), opt.state_dict()) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    msd, osd = box[0]
    fresh = make_model(seed=123)
    fresh.load_state_dict(msd)
    opt2 = _make_opt(fresh, "exact", "empirical", k, seed=0, **kw)
    opt2.load_state_dict(copy.deepcopy(osd))
    ref_model = make_model(seed=5)
    ref_model.load_state_dict(msd)
    ref = _make_opt(ref_model, None, "empirical", k, seed=0, **kw)
    ref.load_state_dict(copy.deepcopy(osd))
    worst, identical = 0.0, True
    for s, step_sizes in enumerate(sizes[2:], start=2):
        x, y = global_batch(gen, sum(step_sizes), "cross_entropy")
        sl = _slice(step_sizes, rank)
        _backward(ref, ref_model(x), y, "empirical", "cross_entropy", s)
        ref.step()
        _backward(opt2, fresh(x[sl]), y[sl], "empirical", "cross_entropy", s)
        opt2.step()
        worst = max(worst, max(rel_err(p.detach(), q.detach())
                               for p, q in zip(fresh.parameters(), ref_model.parameters())))
        identical &= _identical_everywhere(fresh)
    return dict(worst=worst, identical=identical)


PRIOR_KW = dict(prior_beta=0.9, prior_floor=0.05)


def _same_everywhere(tensors) -> bool:
    """True when these tensors equal rank 0's bit for bit (all ranks agree on the answer)."""
    mine = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]) if tensors else torch.zeros(1)
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    same = torch.tensor([float(torch.equal(mine, ref))], dtype=torch.float64)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item() == 1.0)


def _prior_tensors(kept: dict) -> list:
    out = []
    for ops in kept.values():
        for op in ops or ():
            out += [op.q_out, op.q_in, op.s] if isinstance(op, eigenbasis.Rotated) else [op]
    return out


class _GlobalMoments:
    """The oracle's own second moments of the global gradients (the definitions of curvature/prior.py and
    eigenbasis.py): v = beta v + (1 - beta) g^2 from v_1 = g_1^2 for a parameter kept diagonal; for a
    rotatable weight G [o, n] the factors L = b L + (1 - b) G G^T and R = b R + (1 - b) G^T G from 0."""

    def __init__(self, beta: float) -> None:
        self.beta, self.v, self.l, self.r = beta, {}, {}, {}

    def update(self, g: dict, rotatable: dict) -> None:
        b = eigenbasis.SHAMPOO_BETA
        for n, t in g.items():
            if rotatable[n]:
                G = t.reshape(t.shape[0], -1)
                self.l[n] = b * self.l.get(n, 0.0) + (1 - b) * G @ G.T
                self.r[n] = b * self.r.get(n, 0.0) + (1 - b) * G.T @ G
            else:
                self.v[n] = t.square() if n not in self.v else self.beta * self.v[n] + (1 - self.beta) * t.square()

    def worst(self, model, state: dict) -> float:
        """The largest relative error of the optimizer's kept moments against these."""
        errs = []
        for n, p in model.named_parameters():
            st = state[p]
            if n in self.l:
                errs += [rel_err(st["prior_l"], self.l[n]), rel_err(st["prior_r"], self.r[n])]
            else:
                errs.append(rel_err(st["prior_v"], self.v[n]))
        return max(errs)


def check_prior(rank, world, sizes, prior, k, mode="local", ddp=False):
    """Under a prior: the prior's moments follow the *global* gradient (the oracle's own, _GlobalMoments),
    the kept D is the same on every rank, parameters are identical, and the change is -lr mean_r (F_r + a D)^-1 g
    with F_r the oracle Fisher of rank r's batch (distributed="local"), or -lr (F + a D)^-1 g with F the
    global batch's ("exact"); g the global gradient and D the kept prior (kept_prior_matrix; the identity
    where a block keeps none)."""
    lr, damping = 0.3, 0.5
    model = make_model()
    net = nn.parallel.DistributedDataParallel(model) if ddp else model     # DDP: its hook reduces the gradient
    opt = _make_opt(net, mode, "empirical", k, seed=0, lr=lr, damping=damping, prior=prior, **PRIOR_KW)
    view = _view(opt, "module.")
    spread = world if mode == "local" else 1      # local: each rank's direction, averaged
    names = [n for n, _ in model.named_parameters()]
    rot = {n: prior == "soap" and eigenbasis.rotatable(p) for n, p in model.named_parameters()}
    moments = _GlobalMoments(PRIOR_KW["prior_beta"])
    gen = torch.Generator().manual_seed(11)
    worst, worst_moments, identical, same_prior, rotated, F_r = 0.0, 0.0, True, True, 0, None
    for s, step_sizes in enumerate(sizes):
        x, y = global_batch(gen, sum(step_sizes), "cross_entropy")
        sl = _slice(step_sizes, rank)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        g = {n: t.mean(0) for n, t in per_sample_grads(model, x, y, "cross_entropy").items()}
        opt.zero_grad()
        F.cross_entropy(net(x[sl]), y[sl]).backward()
        if s % k == 0:
            on = sl if mode == "local" else slice(None)
            F_r, _ = oracle_fisher(model, x[on], y[on], "empirical", "cross_entropy")
        opt.step()
        kept = {b.name: opt.estimator.kept[b.name].rows.prior for b in opt.blocks}
        same_prior &= _same_everywhere(_prior_tensors(kept))
        dense = {}
        for b, v in zip(opt.blocks, view.blocks):
            for op, n in zip(kept[b.name] or (), v.param_names):
                dense[n] = kept_prior_matrix(op)
                rotated += isinstance(op, eigenbasis.Rotated)
        d = dense_directions(F_r, names, {n: g[n].shape for n in names}, g, [b.param_names for b in view.blocks],
                             damping, [n for n, _ in view.fallback], prior=dense)
        for n in names:
            if spread > 1:
                dist.all_reduce(d[n])
            worst = max(worst, rel_err(model.get_parameter(n).detach() - before[n], -lr * d[n] / spread))
        moments.update(g, rot)
        worst_moments = max(worst_moments, moments.worst(model, opt.state))
        identical &= _identical_everywhere(model)
    return dict(worst=worst, worst_moments=worst_moments, identical=identical, same_prior=same_prior,
                rotated=rotated, explain=opt.explain())


def check_rule(rank, world, sizes, mode="local"):
    """step_rule="adam" (prior "soap") on several ranks: Adam's m is the momentum average of the *global*
    gradient and the prior's moments follow it too (the oracle's own), the kept prior is the same on every
    rank, parameters are identical, and the change is -lr mean_r d_r with rank r's d_r the single-process
    rule's step for its own batch's Fisher (distributed="local"; "exact": one d for the global batch's
    Fisher) (tests/test_optim_step_rule_adam.py's oracle):
    d_r = c_b (F_r + a D)^-1 m^ per block, c_b = (a / mean_b) / max(1, RMS_b) (mean_b: the kept prior's
    mean sqrt(v); 1 under the identity prior at the start), and outside every block Adam's step
    m^ / max(sqrt v', floor mean sqrt v') clipped to RMS 1, v' = beta2 v + (1 - beta2) g^2."""
    lr, damping, beta1, beta2, floor = 0.02, 0.5, 0.9, PRIOR_KW["prior_beta"], PRIOR_KW["prior_floor"]
    model = make_model()
    opt = _make_opt(model, mode, "empirical", 2, seed=0, lr=lr, damping=damping, momentum=beta1, prior="soap",
                    step_rule="adam", **PRIOR_KW)
    spread = world if mode == "local" else 1
    names = [n for n, _ in model.named_parameters()]
    rot = {n: eigenbasis.rotatable(p) for n, p in model.named_parameters()}
    moments, m = _GlobalMoments(beta2), {}
    gen = torch.Generator().manual_seed(13)
    worst = worst_m = worst_moments = 0.0
    identical = same_prior = True
    F_r, clipped = None, 0
    for s, step_sizes in enumerate(sizes):
        x, y = global_batch(gen, sum(step_sizes), "cross_entropy")
        sl = _slice(step_sizes, rank)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        g = {n: t.mean(0) for n, t in per_sample_grads(model, x, y, "cross_entropy").items()}
        free_v = {n: beta2 * moments.v.get(n, g[n].square()) + (1 - beta2) * g[n].square() for n, _ in opt.fallback}
        opt.zero_grad()
        F.cross_entropy(model(x[sl]), y[sl]).backward()
        if s % 2 == 0:
            on = sl if mode == "local" else slice(None)
            F_r, _ = oracle_fisher(model, x[on], y[on], "empirical", "cross_entropy")
        opt.step()
        m = {n: beta1 * m.get(n, 0.0) + (1 - beta1) * g[n] for n in names}
        m_hat = {n: m[n] / (1 - beta1 ** (s + 1)) for n in names}
        kept = {b.name: (opt.estimator.kept[b.name].rows.prior, opt.estimator.kept[b.name].rows.prior_mean)
                for b in opt.blocks}
        same_prior &= _same_everywhere(_prior_tensors({k: v[0] for k, v in kept.items()})
                                       + [v[1].reshape(1) for v in kept.values() if v[1] is not None])
        dense, scale = {}, {}
        for b in opt.blocks:
            ops, mean = kept[b.name]
            scale.update({n: 1.0 if mean is None else damping / float(mean) for n in b.param_names})
            for op, n in zip(ops or (), b.param_names):
                dense[n] = kept_prior_matrix(op)
        d = dense_directions(F_r, names, {n: g[n].shape for n in names}, m_hat, [b.param_names for b in opt.blocks],
                             damping, [], prior=dense)
        for b in opt.blocks:           # Adafactor's update clipping of rank r's own d: RMS over the block <= 1
            rms = float((sum((scale[n] * d[n]).square().sum() for n in b.param_names)
                         / sum(d[n].numel() for n in b.param_names)).sqrt())
            clipped += rms > 1
            scale.update({n: scale[n] / max(1.0, rms) for n in b.param_names})
        for n, _ in opt.fallback:
            root = free_v[n].sqrt()
            d[n] = m_hat[n] / torch.clamp(root, min=floor * float(root.mean()))
            scale[n] = 1.0 / max(1.0, float(d[n].square().mean().sqrt()))
        for n in names:
            step = scale[n] * d[n]
            if spread > 1:
                dist.all_reduce(step)
            worst = max(worst, rel_err(model.get_parameter(n).detach() - before[n], -lr * step / spread))
            worst_m = max(worst_m, rel_err(opt.state[model.get_parameter(n)]["exp_avg"], m[n]))
        moments.update(g, rot)
        worst_moments = max(worst_moments, moments.worst(model, opt.state))
        identical &= _identical_everywhere(model)
    return dict(worst=worst, worst_m=worst_m, worst_moments=worst_moments, identical=identical,
                same_prior=same_prior, clipped=clipped)


def run_many(rank, world, checks):
    """checks: [(name, function name, kwargs)] -> {name: result}"""
    import time

    out, seconds = {}, {}
    for name, fn, kwargs in checks:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        out[name] = globals()[fn](rank, world, **kwargs)
        seconds[name] = round(time.perf_counter() - t0, 2)
    out["_seconds"] = seconds
    return out


def check_stuck_rank(rank, world, stall: float):
    """The last rank stalls (never reaches the step); the others must raise, not hang, once the
    process group's timeout has passed. Returns (raised?, seconds waited, error text) per rank."""
    import time

    model = make_model()
    opt = _make_opt(model, "exact", "empirical", 1, seed=0)
    x, y = global_batch(torch.Generator().manual_seed(0), 2, "cross_entropy")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if rank == world - 1:
        time.sleep(stall)
        return dict(raised=None, seconds=stall, error="")
    t0 = time.monotonic()
    try:
        opt.step()
    except Exception as err:   # noqa: BLE001 - gloo's timeout error is what we expect
        return dict(raised=True, seconds=time.monotonic() - t0, error=f"{type(err).__name__}: {err}"[:300])
    return dict(raised=False, seconds=time.monotonic() - t0, error="")


def check_demo(rank, world):
    """The torchrun demo's main on this group, tiny sizes; rank 0 returns what it printed."""
    import contextlib
    import io

    from tengrad.demo import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["--distributed", "--dataset", "digits", "--train-subset", "96", "--test-subset", "40",
                     "--width", "4", "--hidden", "16", "--batch-size", "25", "--epochs", "1",
                     "--optimizers", "sgd,tengrad"])
    return dict(code=code, out=buf.getvalue())


# ------------------------------------------------------------------ what test_optim_distributed.py runs
UNEVEN = {2: [[3, 2], [2, 4], [1, 3], [4, 2]], 3: [[2, 3, 1], [3, 1, 2], [1, 2, 2], [2, 2, 3]]}


def checks(world: int) -> list:
    """[(name, function name in this module, kwargs)]: every check of a group of ``world`` ranks."""
    s = UNEVEN[world]
    exact = [
        ("exact-empirical-k1", dict(fisher="empirical", k=1, ddp=False, sizes=s[:2])),
        ("exact-empirical-k3-ddp", dict(fisher="empirical", k=3, ddp=True, sizes=s)),
        ("exact-mc-k1-ddp", dict(fisher="mc", k=1, ddp=True, sizes=s[:2])),
        ("exact-exact-k3-mse", dict(fisher="exact", loss="mse", k=3, ddp=False, sizes=s)),
    ]
    if world == 2:
        exact += [
            ("exact-empirical-k3", dict(fisher="empirical", k=3, ddp=False, sizes=s)),
            ("exact-mc-k3", dict(fisher="mc", k=3, ddp=False, sizes=s)),
            ("exact-exact-k1-ddp", dict(fisher="exact", k=1, ddp=True, sizes=s[:2])),
        ]
    checks = [(name, "check_exact", kw) for name, kw in exact]
    checks += [("single-exact-k3-groups", "check_single_process",
                dict(sizes=s, k=3, fisher="exact", param_groups=True)),
               ("single-empirical-k1-ddp", "check_single_process",
                dict(sizes=s[:2], k=1, fisher="empirical", ddp=True)),
               ("local-empirical-k1", "check_local", dict(sizes=s[:2], k=1)),
               ("local-mc-k3", "check_local", dict(sizes=s, k=3, fisher="mc")),
               ("local-prior-adam-k2", "check_prior", dict(sizes=s, prior="adam", k=2)),
               ("local-prior-soap-k1", "check_prior", dict(sizes=s, prior="soap", k=1)),
               ("local-prior-soap-k2-ddp", "check_prior", dict(sizes=s, prior="soap", k=2, ddp=True)),
               ("exact-prior-adam-k2-ddp", "check_prior", dict(sizes=s, prior="adam", k=2, mode="exact", ddp=True)),
               ("exact-prior-soap-k1", "check_prior", dict(sizes=s, prior="soap", k=1, mode="exact")),
               ("exact-prior-soap-k2", "check_prior", dict(sizes=s, prior="soap", k=2, mode="exact")),
               ("local-rule", "check_rule", dict(sizes=s)),
               ("exact-rule", "check_rule", dict(sizes=s, mode="exact")),
               ("failures", "check_failures", dict(ddp=False)),
               ("checkpoint", "check_checkpoint", dict(sizes=s))]
    if world == 2:
        acc = [[5, 4], [4, 6], [6, 5], [4, 4]]           # each rank's slice, split into micro-batches
        checks += [("accumulate-ddp-2-k1", "check_exact", dict(sizes=acc[:2], micro=2, k=1, ddp=True)),
                   ("accumulate-ddp-3-k3", "check_exact", dict(sizes=acc, micro=3, k=3, ddp=True)),
                   ("accumulate-plain-2-k3", "check_exact", dict(sizes=acc, micro=2, k=3, ddp=False))]
        checks += [("local-exact-k1", "check_local", dict(sizes=s[:2], k=1, fisher="exact", loss="mse")),
                   ("failures-ddp", "check_failures", dict(ddp=True)),
                   ("agreement", "check_agreement", {}),
                   ("demo", "check_demo", {})]
    return checks


STALL = 5.0             # seconds the last rank of check_stuck_rank stays away from the step
STUCK_PG_TIMEOUT = 3.0  # the collective timeout of that group
DEAD_PG_TIMEOUT = 10.0  # the collective timeout of the dead-peer group
WORLD_3, WORLD_2, STUCK, DEAD = range(4)     # phase indices


def phases() -> list[Phase]:
    """One spawn of 3 processes: every check on 3 ranks, then on 2 (the first two processes: no new torch
    imports), then the stuck-rank check on 2 ranks with a 3 s collective timeout (last: it breaks its
    group). Each group has a 30 s collective timeout and each phase 150 s (the stuck one 60 s), so a hang
    fails the tests instead of hanging them."""
    return [Phase(run_many, 3, (checks(3),), pg_timeout=30.0, timeout=150.0),
            Phase(run_many, 2, (checks(2),), pg_timeout=30.0, timeout=150.0),
            Phase(check_stuck_rank, 2, (STALL,), pg_timeout=STUCK_PG_TIMEOUT, timeout=60.0),
            Phase(check_dead_peer, 2, (), pg_timeout=DEAD_PG_TIMEOUT, timeout=60.0)]
