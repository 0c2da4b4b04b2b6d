"""The construction warning about fallback parameters: one line per layer type.

Each line names the module type, its fallback parameters and the reason once (an unsupported type's
reason is cut at its first sentence, so the list of registered layers is not repeated per layer)::

    TENGraD: no layer plan for 3 parameter(s); they use the damped identity d = g / damping:
      BatchNorm2d (bn1.weight, bn1.bias, bn2.weight): unsupported: no tengrad spec for module type BatchNorm2d
"""
from __future__ import annotations

from torch import nn


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
    head = (f"TENGraD: no layer plan for {len(fallback)} parameter(s); they use the damped identity "
            "d = g / damping:")
    return "\n".join([head] + [f"  {kind} ({', '.join(n)}): {r}" for kind, (n, r) in lines.items()])
