"""What ``opt.explain()`` prints, and the construction warning about fallback parameters.

``describe``: one line of settings, one per param group when there are several, one per block (its
type, size, path choice and why, the batch its curvature came from, its uses, why the last step
skipped it), the fallback parameters and the distributed estimator's lines.

``fallback_warning``: one line per layer type.

Each line names the module type, its fallback parameters and the reason once (an unsupported type's
reason is cut at its first sentence, so the list of registered layers is not repeated per layer)::

    TENGraD: no layer plan for 3 parameter(s); they use the damped identity d = g / damping:
      BatchNorm2d (bn1.weight, bn1.bias, bn2.weight): unsupported: no tengrad spec for module type BatchNorm2d
"""
from __future__ import annotations

from torch import nn

from tengrad.optim.curvature import eigenbasis


def _short(reason: str) -> str:
    """The first sentence (the registry list after '; registered:' is dropped)."""
    if reason.startswith("unsupported (") and reason.endswith(")"):
        reason = "unsupported: " + reason[len("unsupported ("):-1]
    return reason.split("; registered")[0].split(". ")[0].strip()


def fallback_warning(model: nn.Module, fallback: list, why: dict[str, str]) -> str:
    modules = dict(model.named_modules())
    lines: dict[str, tuple[list[str], str]] = {}
    for name, _ in fallback:
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        label = owner or type(model).__name__
        kind = type(modules.get(owner, model)).__name__
        names, _ = lines.setdefault(kind, ([], _short(why.get(label, "no layer plan"))))
        names.append(name)
    head = (f"TENGraD: no layer plan for {len(fallback)} parameter(s); damped identity d = g / damping "
            "unless an op with a spec reads them in a captured forward (then a block):")
    return "\n".join([head] + [f"  {kind} ({', '.join(n)}): {r}" for kind, (n, r) in lines.items()])


def _hp(g: dict) -> str:
    return f"lr={g['lr']}, damping={g['damping']}, momentum={g['momentum']}, weight_decay={g['weight_decay']}"


def describe(settings: str, groups: list[dict], blocks: list, fallback: list, skipped: dict[str, str],
             extra: list[str]) -> str:
    """The text of ``opt.explain()``; ``settings``: the optimizer-wide options after the groups'."""
    head = _hp(groups[0]) + " (coupled), " if len(groups) == 1 else f"{len(groups)} param groups, "
    lines = [f"TENGraD({head}{settings})"]
    if len(groups) > 1:
        lines += [f"  group {i}: {_hp(g)}, {len(g['params'])} tensors" for i, g in enumerate(groups)]
    where = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
    for b in blocks:
        kind = type(b.module).__name__
        how = ("path undecided (no curvature step yet)" if b.choice is None
               else f"path={b.choice.path}: {b.choice.note}")
        rows = ("" if b.curv is None
                else f", curvature from {b.curv.m} positions of {b.curv.rows.tokens} per sample (token_rows)"
                if b.curv.rows is not None and b.curv.rows.tokens is not None
                else f", curvature from m={b.curv.m} (rows={b.curv.gram.shape[0]})")
        grp = f", group {where.get(id(b.params[0]))}" if len(groups) > 1 else ""
        line = f"  block {b.name} ({kind}, {b.numel} params{rows}{grp}) {how}"
        if b.uses:
            line += f"; uses: {', '.join(b.uses)}"
        if b.curv is not None and (b.curv.rows.prior is not None or b.curv.rows.prior_note is not None):
            kept = b.curv.rows
            rotated = kept.prior is not None and any(isinstance(s, eigenbasis.Rotated) for s in kept.prior)
            line += ("; prior: " + (kept.prior_note or ("eigenbasis D (SOAP: rotated explicit J)" if rotated
                                                        else "diagonal D (x and gy scaled: Kronecker-diagonal)"
                                                        if not kept.explicit_held else "diagonal D")))
        if b.name in skipped:
            line += f"; skipped at the last step: {skipped[b.name]}"
        lines.append(line)
    if fallback:
        lines.append("  fallback d = g / damping: " + ", ".join(n for n, _ in fallback))
    return "\n".join(lines + extra)
