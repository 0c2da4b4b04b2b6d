"""A small parser of affine index expressions, e.g. ``"sh*oh + dh*kh - ph"``, that never evaluates code.

Grammar (whitespace between tokens is ignored)::

    expr  := term (("+" | "-") term)*
    term  := unary ("*" unary)*
    unary := ("+" | "-") unary | atom
    atom  := NAME | INTEGER | "(" expr ")"          NAME = [A-Za-z_][A-Za-z0-9_]*, INTEGER = [0-9]+

The result is a tree of tuples: ``("int", v)``, ``("name", s)``, ``("neg", a)``, ``("add", a, b)``,
``("sub", a, b)``, ``("mul", a, b)``. Nothing in a string is ever looked up, imported or called:
names are only names, and sympy (in index_map.py) receives the tree through :func:`to_sympy`, never
the string. Every failure is a ``SpecError`` naming the offending character and its position; the
text length and the nesting depth are bounded, so no input can exhaust the stack or the memory.
"""
from __future__ import annotations

import re

import sympy

from .errors import SpecError

MAX_LENGTH = 256       # characters; real maps are a few dozen (bounds the tree depth too)
MAX_DEPTH = 40         # nested unary signs and parentheses

_TOKEN = re.compile(r"\s*(?:(?P<int>[0-9]+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>\*\*|[-+*()])|(?P<bad>\S))")

Tree = tuple


def tokenize(text: str) -> list[tuple[str, str, int]]:
    """``[(kind, value, position)]`` with kind in int/name/op; anything else is a SpecError."""
    if not isinstance(text, str):
        raise SpecError(f"an index map must be a string, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise SpecError(f"index map of {len(text)} characters is longer than {MAX_LENGTH}")
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:   # only trailing whitespace remains (rstrip removed it): cannot happen
            break
        kind = match.lastgroup
        value = match.group(kind)
        where = match.start(kind)
        if kind == "bad":
            raise SpecError(f"unexpected character {value!r} at position {where} of {text!r}; an index "
                            "map takes names, integers, +, -, * and parentheses")
        if value == "**":
            raise SpecError(f"'**' at position {where} of {text!r}: not affine (no powers in an index map)")
        tokens.append((kind, value, where))
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def fail(self, what: str) -> SpecError:
        tok = self.peek()
        at = f"{tok[1]!r} at position {tok[2]}" if tok else "the end"
        return SpecError(f"cannot parse index map {self.text!r}: {what}, found {at}")

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise SpecError(f"index map {self.text[:40]!r}... nests deeper than {MAX_DEPTH} levels")

    def expr(self) -> Tree:
        node = self.term()
        while (tok := self.peek()) is not None and tok[1] in "+-" and tok[0] == "op":
            self.i += 1
            node = ("add" if tok[1] == "+" else "sub", node, self.term())
        return node

    def term(self) -> Tree:
        node = self.unary()
        while (tok := self.peek()) is not None and tok[0] == "op" and tok[1] == "*":
            self.i += 1
            node = ("mul", node, self.unary())
        return node

    def unary(self) -> Tree:
        tok = self.peek()
        if tok is not None and tok[0] == "op" and tok[1] in "+-":
            self.i += 1
            self.enter()
            inner = self.unary()
            self.depth -= 1
            return ("neg", inner) if tok[1] == "-" else inner
        return self.atom()

    def atom(self) -> Tree:
        tok = self.peek()
        if tok is None:
            raise self.fail("expected a name, an integer or '('")
        kind, value, _ = tok
        if kind == "int":
            self.i += 1
            return ("int", int(value))
        if kind == "name":
            self.i += 1
            return ("name", value)
        if value == "(":
            self.i += 1
            self.enter()
            node = self.expr()
            self.depth -= 1
            if self.peek() is None or self.peek()[1] != ")":
                raise self.fail("expected ')'")
            self.i += 1
            return node
        raise self.fail("expected a name, an integer or '('")


def parse(text: str) -> Tree:
    """The expression tree of ``text`` (see the module docstring); SpecError on anything else."""
    parser = _Parser(text)
    if not parser.tokens:
        raise SpecError(f"empty index map {text!r}")
    tree = parser.expr()
    if parser.peek() is not None:
        raise parser.fail("expected '+', '-', '*' or the end")
    return tree


def names(tree: Tree) -> set[str]:
    """The names a tree mentions."""
    if tree[0] == "name":
        return {tree[1]}
    if tree[0] == "int":
        return set()
    return set().union(*(names(t) for t in tree[1:]))


def to_sympy(tree: Tree) -> sympy.Expr:
    """The sympy expression of a tree: integer Symbols and Integers combined by Add and Mul only."""
    op = tree[0]
    if op == "int":
        return sympy.Integer(tree[1])
    if op == "name":
        return sympy.Symbol(tree[1], integer=True)
    if op == "neg":
        return -to_sympy(tree[1])
    a, b = to_sympy(tree[1]), to_sympy(tree[2])
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    return a * b
