"""The ``tengrad`` command line: ``explain`` prints a layer's plan, ``demo`` trains 3C1F.

    tengrad explain "nn.Conv2d(128, 128, 3, padding=1)" --input 128,128,28,28
    tengrad explain "nn.Linear(1024, 1024)" --input 128,1024 --batch 8,32,128,512

The module expression is parsed, never evaluated (``parse_module``: a call of an ``nn`` class with
literal arguments) and the module is built on the meta device, so explaining a layer allocates none
of its weights. Errors (a bad argument, a module expression that is not such a call or does not
build, a TengradError such as a wrong channel count or an unsupported module) print one line on
stderr and exit with code 2.
"""
from __future__ import annotations

import argparse
import ast
import math
import sys

import torch
from torch import nn

import tengrad


class CliError(Exception):
    """A bad command line: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise CliError(f"{message} (see {self.prog} --help)")


def parse_module(text: str) -> tuple[type, list, dict]:
    """(class, args, kwargs) of a module expression ``nn.Name(literal, ..., key=literal, ...)``.

    The text is parsed, never evaluated: through ``ast``, it must be one call of an attribute of
    ``nn`` (or ``torch.nn``) that is an ``nn.Module`` class, whose arguments are Python literals
    (numbers, strings, booleans, None, tuples, lists, dicts of them; ``ast.literal_eval``). Anything
    else is a ``CliError`` naming what was found.
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise CliError(f"cannot build {text!r}: not an expression ({exc.msg})") from None
    call = tree.body
    if not isinstance(call, ast.Call):
        raise CliError(f"cannot build {text!r}: {text!r} is not an nn.Module call such as "
                       f"nn.Conv2d(16, 32, 3, padding=1) (got {type(call).__name__})")
    func = call.func
    path = []
    while isinstance(func, ast.Attribute):
        path.insert(0, func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        path.insert(0, func.id)
    if not (isinstance(func, ast.Name) and len(path) >= 2 and path[:-1] in (["nn"], ["torch", "nn"])):
        raise CliError(f"cannot build {text!r}: the call must be of nn.<Module> (e.g. nn.Linear), got "
                       f"{ast.unparse(call.func)!r}")
    cls = getattr(nn, path[-1], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CliError(f"cannot build {text!r}: nn.{path[-1]} is not an nn.Module class")
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        raise CliError(f"cannot build {text!r}: write the arguments out (no *args or **kwargs)")
    args = [_literal(text, a) for a in call.args]
    return cls, args, {k.arg: _literal(text, k.value) for k in call.keywords}


def _literal(text: str, node: ast.AST) -> object:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise CliError(f"cannot build {text!r}: arguments must be literals (numbers, strings, tuples, ...), "
                       f"got {ast.unparse(node)!r}") from None


def build_module(text: str) -> nn.Module:
    """The module of a module expression (``parse_module``), built on the meta device: its parameters
    have shapes but no storage, so even ``nn.Linear(20000, 20000)`` allocates nothing (a plan needs
    only the sizes)."""
    cls, args, kwargs = parse_module(text)
    try:
        with torch.device("meta"):
            module = cls(*args, **kwargs)
    except Exception as exc:  # any error of the constructor is reported, not raised
        raise CliError(f"cannot build {text!r}: {type(exc).__name__}: {exc}") from None
    return module


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 128,3,28,28") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be a positive integer")
    return dims


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the memory cap must be a positive number of GiB")
    return value


def explain(args) -> int:
    module = build_module(args.module)
    dtype = getattr(torch, args.dtype)
    backend = "triton" if args.triton else args.backend
    plan = tengrad.compile(module, backend=backend, memory_cap=int(args.memory_cap * 2**30))
    module.to(dtype if not plan.reads_ids else torch.float32)

    def sized(m: int):
        shape = (m, *args.input[1:])
        x = torch.empty(shape, dtype=torch.long if plan.reads_ids else dtype, device="meta")
        return plan.sized(shape, plan.output_shape(x), dtype)

    batches = args.batch or [args.input[0]]
    if len(batches) > 1:
        print(f"gram order by batch size for {module} on input (m, {', '.join(map(str, args.input[1:]))}):")
        names = plan.orders("gram")
        print(f"  {'m':>6}  " + "  ".join(f"{n:>14}" for n in names) + "   chosen")
        for m in batches:
            sp = sized(m)
            print(f"  {m:>6}  " + "  ".join(f"{sp.cost('gram', n).flops:>14.3e}" for n in names)
                  + f"   {sp.choice['gram']}")
        print()
    print(sized(batches[-1] if args.batch else args.input[0]))
    if backend == "triton":
        print(plan.source())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options (argparse.REMAINDER drops leading flags)
        from tengrad.demo import main as demo_main
        return demo_main(argv[1:])
    parser = _Parser(prog="tengrad", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="print the plan of a layer: roles, equations, orders, costs, choice")
    ex.add_argument("module", help='a module expression, e.g. "nn.Conv2d(128, 128, 3, padding=1)"')
    ex.add_argument("--input", type=_shape, required=True, help="input shape with batch, e.g. 128,128,28,28")
    ex.add_argument("--batch", type=lambda s: list(_shape(s)), help="batch sizes to compare, e.g. 8,32,128")
    ex.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    ex.add_argument("--memory-cap", type=_gib, default=4.0, help="GiB of extra memory an order may use")
    ex.add_argument("--backend", default="torch", choices=["torch", "triton", "auto"],
                    help="plan for this backend: its orders, and what it runs for each step (triton: also "
                         "the generated source)")
    ex.add_argument("--triton", action="store_true", help="same as --backend triton")
    sub.add_parser("demo", help="train 3C1F with SGD and TENGraD side by side (tengrad demo --help)")
    try:
        args = parser.parse_args(argv)
        return explain(args)
    except (CliError, tengrad.TengradError) as exc:
        where = "tengrad explain" if argv[:1] == ["explain"] else "tengrad"
        line = " ".join(str(exc).split())        # one line, however the message was wrapped
        print(f"{where}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
