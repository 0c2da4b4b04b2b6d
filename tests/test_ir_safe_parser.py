"""Index maps and notation are parsed, never evaluated: any string either parses or raises TengradError
(never another exception, never a side effect). Spec factories that return the wrong thing are refused
naming the module type.

The parser's meaning is checked against an independent oracle: random affine trees are rendered to
strings, and the parsed map must agree with the tree evaluated in plain Python at random points.
"""
from __future__ import annotations

import os
import random
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tengrad
from tengrad import Term
from tengrad_ir import IndexMap, LayerSpec, SpecError, TengradError
from tengrad_ir import affine

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- side-effect detector
_EVENTS: list[str] = []
_WATCH = {"exec", "compile", "open", "os.system", "os.chdir", "os.remove", "subprocess.Popen",
          "builtins.input", "socket.connect", "shutil.rmtree", "os.listdir", "os.scandir"}
_ARMED = [False]


def _audit(event, args):
    if _ARMED[0] and event in _WATCH:
        _EVENTS.append(event)


sys.addaudithook(_audit)   # inert unless a test arms it (audit hooks cannot be removed)


def parse_watched(fn, *args, **kwargs):
    """fn(*args) with code execution, file and process events recorded; returns (result, error)."""
    _EVENTS.clear()
    _ARMED[0] = True
    try:
        try:
            return fn(*args, **kwargs), None
        except TengradError as err:
            return None, err
    finally:
        _ARMED[0] = False
        assert not _EVENTS, f"side effects while parsing: {_EVENTS}"


# ---------------------------------------------------------------- the parser itself
@pytest.mark.parametrize("text, consts, coeffs, offset", [
    ("sh*oh + dh*kh - ph", dict(sh=2, dh=3, ph=1), {"kh": 3, "oh": 2}, -1),
    ("2*(oh + kh) - 1", {}, {"kh": 2, "oh": 2}, -1),
    ("-(-oh) + kh*2", {}, {"kh": 2, "oh": 1}, 0),
    ("  oh+kh  ", {}, {"kh": 1, "oh": 1}, 0),
    ("oh + E + I", dict(E=2, I=3), {"oh": 1}, 5),     # sympify would read E as e and I as sqrt(-1)
    ("(oh - 3) * s + 1", dict(s=2), {"oh": 2}, -5),
])
def test_affine_maps_parse_to_integer_coefficients(text, consts, coeffs, offset):
    m = IndexMap.parse("ih", text, {"oh", "kh"}, consts)
    assert m.coeffs == coeffs and m.offset == offset


@pytest.mark.parametrize("text, needle", [
    ("oh * kh", "not affine"),
    ("oh**2 + kh", "'**' at position 2"),
    ("oh / 2", "unexpected character '/' at position 3"),
    ("oh +", "expected a name, an integer or '('"),
    ("(oh + kh", "expected ')'"),
    ("oh kh", "expected '+', '-', '*' or the end"),
    ("", "empty index map"),
    ("1.5*oh", "unexpected character '.'"),
    ("-oh + kh", "coefficient of oh must be a positive integer"),
    ("o" * 300, "longer than 256"),
    ("(" * 60 + "oh" + ")" * 60, "nests deeper than"),
    ("-" * 80 + "oh", "nests deeper than"),
    ("zz + oh", "unknown symbol 'zz'"),
])
def test_bad_maps_raise_spec_error_naming_the_problem(text, needle):
    _, err = parse_watched(IndexMap.parse, "ih", text, {"oh", "kh"}, {})
    assert isinstance(err, SpecError) and needle in str(err), err


@pytest.mark.parametrize("payload", [
    "__import__('os').getcwd()",
    "__import__('os').system('touch pwned')",
    "open('pwned', 'w').write('x')",
    "exec(\"open('pwned','w')\")",
    "().__class__.__bases__[0].__subclasses__()",
    "lambda: open('pwned', 'w')",
    "oh + __import__('pathlib').Path('pwned').touch()",
])
def test_code_payloads_in_a_map_run_nothing_and_raise(payload, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, err = parse_watched(LayerSpec.parse, "n ih, k -> n oh", maps={"ih": payload})
    assert isinstance(err, SpecError) and "ih" in str(err)
    assert os.listdir(tmp_path) == [], "a payload created a file"


@pytest.mark.parametrize("bad", [123, None, b"n i, o i -> n o", ["n i, o i -> n o"]])
def test_non_string_equations_raise_spec_error(bad):
    with pytest.raises(SpecError, match="must be a string"):
        LayerSpec.parse(bad)


@pytest.mark.parametrize("maps, consts, needle", [
    ({"ih": 1.5}, {}, "must be a string or a sympy expression, got float"),
    ({"ih": ["oh"]}, {}, "got list"),
    ({"ih": "oh + s"}, {"s": "2"}, "constant 's' must be an int"),
    ({"ih": "oh + s"}, {"s": True}, "constant 's' must be an int"),
    ({"ih": "oh + s"}, [("s", 1)], "constants must be a dict"),
])
def test_non_string_maps_and_bad_constants_raise_spec_error(maps, consts, needle):
    with pytest.raises(SpecError, match=needle):
        LayerSpec.parse("n ih, k -> n oh", maps=maps, constants=consts)


# ---------------------------------------------------------------- fuzzing
TOKENS = ["oh", "kh", "s", "2", "0", "17", "+", "-", "*", "**", "(", ")", " ", "/", ".", "'", "__import__",
          "os", "E", "I", "[", "]", ",", "lambda", ":", "\n", "=", "%", "1e3", "\\", "j"]


@SETTINGS
@given(st.one_of(st.text(max_size=40), st.lists(st.sampled_from(TOKENS), max_size=14).map("".join)))
def test_fuzzed_map_strings_parse_or_raise_tengrad_error(text):
    result, err = parse_watched(IndexMap.parse, "ih", text, {"oh", "kh"}, {"s": 3})
    if err is None:
        assert all(isinstance(c, int) and c > 0 for c in result.coeffs.values())
        assert isinstance(result.offset, int) and set(result.coeffs) <= {"oh", "kh"}


NOTATION = ["n", "i", "o", "t", "*t", "(", ")", ",", "->", " ", "g", "ih", "k", "-", ">", "*", "1", "é", "\t"]


@SETTINGS
@given(st.one_of(st.text(max_size=30), st.lists(st.sampled_from(NOTATION), max_size=16).map("".join)),
       st.one_of(st.none(), st.text(max_size=12), st.lists(st.sampled_from(TOKENS), max_size=8).map("".join)))
def test_fuzzed_notation_and_maps_parse_or_raise_tengrad_error(equation, map_text):
    maps = None if map_text is None else {"ih": map_text}
    parse_watched(LayerSpec.parse, equation, maps=maps, constants={"s": 2})


def _tree(rng: random.Random, depth: int):
    """A random affine tree: (string, evaluate(env) -> int) built independently of the parser."""
    pick = rng.random()
    if depth == 0 or pick < 0.3:
        if rng.random() < 0.5:
            v = rng.randint(0, 9)
            return str(v), (lambda env, v=v: v)
        name = rng.choice(["oh", "kh", "s"])
        return name, (lambda env, name=name: env[name])
    if pick < 0.45:
        text, f = _tree(rng, depth - 1)
        return f"-({text})", (lambda env, f=f: -f(env))
    (ta, fa), (tb, fb) = _tree(rng, depth - 1), _tree(rng, depth - 1)
    if pick < 0.65:
        return f"{ta} + {tb}", (lambda env: fa(env) + fb(env))
    if pick < 0.85:
        return f"{ta} - ({tb})", (lambda env: fa(env) - fb(env))
    c = rng.randint(0, 4)                        # keep it affine: one factor is a constant
    return (f"{c}*({ta})", (lambda env: c * fa(env))) if rng.random() < 0.5 else \
        (f"({ta})*s", (lambda env: fa(env) * env["s"]))


@pytest.mark.parametrize("seed", range(40))
def test_parsed_maps_agree_with_the_tree_evaluated_in_python(seed):
    rng = random.Random(seed)
    text, f = _tree(rng, 4)
    tree = affine.parse(text)
    assert affine.names(tree) <= {"oh", "kh", "s"}
    for _ in range(5):
        env = {"oh": rng.randint(-5, 5), "kh": rng.randint(-5, 5), "s": 3}
        assert int(affine.to_sympy(tree).subs({__import__("sympy").Symbol(k, integer=True): v
                                               for k, v in env.items()})) == f(env), text
    result, err = parse_watched(IndexMap.parse, "ih", text, {"oh", "kh"}, {"s": 3})
    if err is None:                               # positive coefficients: the map is f exactly
        for _ in range(5):
            env = {"oh": rng.randint(0, 5), "kh": rng.randint(0, 5), "s": 3}
            assert sum(c * env[k] for k, c in result.coeffs.items()) + result.offset == f(env), text
    else:
        assert "coefficient" in str(err) or "not affine" in str(err), err


# ---------------------------------------------------------------- spec factories
def _layer_with(factory, label):
    cls = type(label, (nn.Module,), {"__init__": lambda self: (nn.Module.__init__(self), setattr(
        self, "weight", nn.Parameter(torch.randn(3, 4))))[0], "forward": lambda self, x: x @ self.weight.T})
    tengrad.register_layer(cls, factory)
    return cls()


def _raises_value_error(module):
    raise ValueError("boom")


LINEAR = LayerSpec.parse("n i, o i -> n o", name="w")


@pytest.mark.parametrize("factory, needle", [
    (lambda m: None, "returned NoneType; it must return a list of tengrad.Term"),
    (lambda m: "n i, o i -> n o", "returned str"),
    (lambda m: [None], "returned NoneType at position 0"),
    (lambda m: ["n i, o i -> n o"], "returned str at position 0"),
    (lambda m: [Term("weight", "n i, o i -> n o")], "needs a parameter name (str) and a LayerSpec"),
    (lambda m: [Term(0, LINEAR)], "needs a parameter name (str) and a LayerSpec"),
    (lambda m: [Term("weight", LINEAR, pre_map="x*2")], "pre_map of term 'weight' is not callable"),
    (lambda m: [Term("weight", LINEAR), Term("weight", LINEAR)], "two terms for 'weight'"),
    (_raises_value_error, "raised ValueError: boom"),
])
def test_bad_spec_factory_output_is_a_tengrad_error_naming_the_module_type(factory, needle):
    label = f"MyLayer{abs(hash(needle)) % 10000}"
    module = _layer_with(factory, label)
    with pytest.raises(TengradError) as info:
        tengrad.compile(module)
    assert label in str(info.value) and needle in str(info.value), str(info.value)


def test_a_good_user_factory_still_compiles():
    module = _layer_with(lambda m: [Term("weight", LINEAR)], "MyGoodLayer")
    x, gy = torch.randn(5, 4), torch.randn(5, 3)
    k = tengrad.compile(module).gram(x, gy)
    assert torch.allclose(k, (x @ x.T) * (gy @ gy.T))
