"""Shared check: every call of a compiled layer runs exactly the steps its plan prints.

``check_layer`` calls gram / jvp / vjp / jacobian for every order the backend runs and for
``order=None``, with ``plan.trace`` on, and compares each term's recorded steps with the order of
the printed plan: the same step objects in the same order, the chosen order when none was asked
for, and the printed block (each step with what the backend runs for it) found in ``repr(plan)``.
"""
from __future__ import annotations

import torch


def printed_block(step_list, backend, classes=None) -> str:
    return "\n".join(f"        {s}\n            -> {backend.describe(s, classes)}" for s in step_list)


def check_layer(plan, x: torch.Tensor, gy: torch.Tensor, gen: torch.Generator) -> list[str]:
    bad: list[str] = []
    p = [torch.randn(q.shape, generator=gen, dtype=gy.dtype) for _, q in plan.params]
    u = torch.randn(gy.shape[0], generator=gen, dtype=gy.dtype)
    backend = plan.backend_for(gy)
    calls = [("jacobian", None, lambda o: plan.jacobian(x, gy))]
    for q, fn in (("gram", lambda o: plan.gram(x, gy, order=o)), ("jvp", lambda o: plan.jvp(x, gy, p, order=o)),
                  ("vjp", lambda o: plan.vjp(x, gy, u, order=o))):
        calls += [(q, o, fn) for o in (None, *plan.orders(q))]
    texts: dict[int, str] = {}
    for q, asked, fn in calls:
        plan.trace = []
        fn(asked)
        records, plan.trace = plan.trace, None
        sized = plan.sized(x.shape, gy.shape, gy.dtype, backend)
        if id(sized) not in texts:           # repr (sympy costs) once per sized plan
            texts[id(sized)] = repr(sized)
        text = texts[id(sized)]
        if len(records) != len(sized.terms):
            bad.append(f"{q} {asked}: {len(records)} records for {len(sized.terms)} terms")
        for (param, quantity, name, steps), (tname, sp) in zip(records, sized.terms):
            label = f"{sp.spec.name} {q} order={asked} ran {name}"
            want = sp.chosen(q).name if asked is None or asked not in [o.name for o in sp.runnable(q)] else asked
            if (param, quantity, name) != (tname, q, want):
                bad.append(f"{label}: recorded {(param, quantity, name)}, expected {(tname, q, want)}")
                continue
            order = sp.order(q, name)
            if steps != order.steps:
                bad.append(f"{label}: ran {[str(s) for s in steps]}, printed {[str(s) for s in order.steps]}")
            if printed_block(steps, backend, sp.classes) not in text:
                bad.append(f"{label}: the steps it ran are not printed in repr(plan)")
    return bad
