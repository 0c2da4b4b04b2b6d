"""The package's layering rules, checked on its source (AST): they fail on the first violation.

1. Below ``optimizer.py`` no function in ``tengrad/optim`` takes the optimizer object (a parameter
   named ``opt``/``optimizer`` or annotated ``TENGraD``/``Optimizer``): modules below get the data they
   need, never the whole optimizer.
2. No module reads another module's underscore-prefixed names: no ``from x import _name``, no
   ``module._name`` on an imported tengrad module, and no ``obj._name`` where ``_name`` is a private
   attribute or method that only a class of another module defines.
3. One record type for a captured use: ``capture/record.py``'s ``Use`` is the only class in
   ``tengrad/optim`` that holds a layer input with its output gradients (attributes ``x`` and ``grad``).
4. No broad ``except`` (bare, ``Exception``, ``BaseException``) that could swallow a programming error
   such as AttributeError: its handler re-raises, or hands the error to the distributed step's
   ``Failure.record``, which raises it on every rank (and a programming error as itself).
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tengrad"
OPTIM = PACKAGE / "optim"


def _modules(root: pathlib.Path) -> dict[pathlib.Path, ast.Module]:
    return {p: ast.parse(p.read_text(), filename=str(p)) for p in sorted(root.rglob("*.py"))}


ALL = _modules(PACKAGE) | _modules(ROOT / "tengrad_ir")


def _where(path: pathlib.Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_the_rules_see_the_package():
    assert OPTIM / "optimizer.py" in ALL and len([p for p in ALL if OPTIM in p.parents]) >= 20


def test_no_function_below_the_optimizer_takes_it():
    bad = []
    for path, tree in ALL.items():
        if OPTIM not in path.parents or path.name == "optimizer.py":
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            a = node.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs:
                ann = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if arg.arg in ("opt", "optimizer") or "TENGraD" in ann or ann.endswith("Optimizer"):
                    bad.append(f"{_where(path, node)} {getattr(node, 'name', 'lambda')}({arg.arg})")
    assert not bad, "functions below optimizer.py that take the optimizer:\n" + "\n".join(bad)


def _private_definitions() -> dict[str, set[pathlib.Path]]:
    """Private attribute / method name -> the modules whose classes define it (self._x = ..., def _x)."""
    defs: dict[str, set[pathlib.Path]] = {}
    for path, tree in ALL.items():
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for node in ast.walk(cls):
                name = None
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_private(node.name):
                    name = node.name
                elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                      and isinstance(node.value, ast.Name) and node.value.id == "self" and _is_private(node.attr)):
                    name = node.attr
                elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _is_private(node.value) \
                        and node.value.isidentifier():
                    name = node.value      # __slots__ entries
                if name is not None:
                    defs.setdefault(name, set()).add(path)
    return defs


def test_no_module_reads_another_modules_private_names():
    defs = _private_definitions()
    bad = []
    for path, tree in ALL.items():
        imported_modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("tengrad", "tengrad_ir")) \
                    or isinstance(node, ast.ImportFrom) and node.level:
                for alias in node.names:
                    if _is_private(alias.name):
                        bad.append(f"{_where(path, node)} imports {alias.name}")
                    imported_modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(("tengrad", "tengrad_ir")):
                        imported_modules.add((alias.asname or alias.name).split(".")[0])
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if isinstance(base, ast.Name) and base.id in imported_modules:
                bad.append(f"{_where(path, node)} reads {base.id}.{node.attr}")
                continue
            owners = defs.get(node.attr)
            if owners and path not in owners:
                bad.append(f"{_where(path, node)} reads {ast.unparse(node)} (defined in "
                           f"{', '.join(str(o.relative_to(ROOT)) for o in sorted(owners))})")
    assert not bad, "reads of another module's private names:\n" + "\n".join(bad)


def test_one_record_type_for_a_captured_use():
    holders = []
    for path, tree in ALL.items():
        if OPTIM not in path.parents:
            continue
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            attrs = set()
            for node in ast.walk(cls):
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                        and isinstance(node.value, ast.Name) and node.value.id == "self":
                    attrs.add(node.attr)
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    attrs.add(node.target.id)
                elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                    attrs.add(node.value)      # __slots__
            if {"x", "grad"} <= attrs:
                holders.append(f"{path.relative_to(ROOT)}::{cls.name}")
    assert holders == ["tengrad/optim/capture/record.py::Use"], holders


BROAD = ("Exception", "BaseException")


def _handler_ok(handler: ast.ExceptHandler) -> bool:
    for node in ast.walk(handler):
        if isinstance(node, ast.Raise):
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "record":
            return True          # the distributed Failure: raised on every rank (estimator/comm.py)
    return False


@pytest.mark.parametrize("root", [PACKAGE, ROOT / "tengrad_ir"], ids=["tengrad", "tengrad_ir"])
def test_no_broad_except_swallows_an_error(root):
    bad = []
    for path, tree in ALL.items():
        if root not in path.parents:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.ExceptHandler):
                continue
            names = [ast.unparse(t) for t in (node.type.elts if isinstance(node.type, ast.Tuple) else [node.type])] \
                if node.type is not None else ["(bare)"]
            if any(n in BROAD or n == "(bare)" for n in names) and not _handler_ok(node):
                bad.append(f"{_where(path, node)} except {', '.join(names)}")
    assert not bad, "broad except handlers that neither re-raise nor record for all ranks:\n" + "\n".join(bad)


def test_programming_errors_keep_their_type_in_the_distributed_step():
    from tengrad.optim.estimator.comm import PROGRAMMING_ERRORS
    assert AttributeError in PROGRAMMING_ERRORS and NameError in PROGRAMMING_ERRORS


def test_rows_are_built_in_one_place_and_every_estimator_uses_it():
    """A block's Jacobian rows come from curvature/build.py only (woodbury.py's own methods and a
    checkpoint's load rebuild held rows); the local, exact and averaged estimators all call it."""
    makers = set()
    callers = set()
    for path, tree in ALL.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = ast.unparse(node.func)
                if f in ("Rows", "woodbury.Rows"):
                    makers.add(path.relative_to(ROOT).as_posix())
                if f.endswith("block_rows"):
                    callers.add(path.relative_to(ROOT).as_posix())
    assert makers == {"tengrad/optim/curvature/build.py", "tengrad/optim/curvature/woodbury.py",
                      "tengrad/optim/checkpoint.py"}, makers
    assert {"tengrad/optim/estimator/local.py", "tengrad/optim/estimator/exact.py",
            "tengrad/optim/estimator/averaged.py"} <= callers, callers
