"""The IR rejects specs that contradict themselves, naming the offending index or map."""
import pytest

from tengrad_ir import LayerSpec, SpecError

CONV = "n (g ci) ih iw, (g co) ci kh kw -> n (g co) oh ow"
CONV_MAPS = {"ih": "sh*oh + dh*kh - ph", "iw": "sw*ow + dw*kw - pw"}
CONSTS = dict(sh=2, dh=1, ph=1, sw=1, dw=2, pw=0)


def test_conv_roles_follow_from_notation():
    s = LayerSpec.parse(CONV, maps=CONV_MAPS, constants=CONSTS, sizes={"g": 2})
    assert s.indices("batch") == ("n",)
    assert s.indices("group") == ("g",)
    assert s.indices("free") == ("co",)
    assert set(s.indices("independent")) == {"ci", "kh", "kw"}
    assert set(s.indices("common")) == {"oh", "ow"}
    assert s.map_of["ih"].coeffs == {"kh": 1, "oh": 2} and s.map_of["ih"].offset == -1


@pytest.mark.parametrize("eq, roles", [
    ("n t i, o i -> n t o", {"n": "batch", "t": "common", "i": "independent", "o": "free"}),
    ("n t d, d -> n t d", {"n": "batch", "t": "common", "d": "group"}),
    ("n s d, t s -> n t d", {"n": "batch", "s": "independent", "d": "common", "t": "free"}),
])
def test_roles_of_classic_layers(eq, roles):
    assert LayerSpec.parse(eq).roles == roles


@pytest.mark.parametrize("eq, kwargs, needle", [
    ("n i, o i -> n o z", {}, "'z' appears only in the output"),
    ("n i q, o i -> n o", {}, "'q' appears only in the input"),
    ("n i, o i q -> n o", {}, "'q' appears only in the parameter"),
    ("n i, o i, o i -> n o", {}, "3 operands"),
    ("n i, o i -> n o", {"roles": {"i": "common"}}, "'i' is declared common but the notation makes it independent"),
    ("n i, o i -> n o", {"roles": {"o": "wibble"}}, "unknown role 'wibble'"),
    ("n ih, k -> n oh", {"maps": {"ih": "oh * k"}}, "ih = oh * k: not affine"),
    ("n ih, k -> n oh", {"maps": {"ih": "oh + k + zz"}}, "unknown symbol 'zz'"),
    ("n ih, k -> n oh", {"maps": {"ih": "oh - k"}}, "coefficient of k must be a positive integer"),
    ("n ih, k -> n oh", {"maps": {"ih": "oh**2 + k"}}, "not affine"),
    ("n ih, k -> n oh", {"maps": {"jh": "oh + k"}}, "target 'jh' is not an input index"),
    ("n i, n o i -> n o", {}, "batch index 'n' appears in the parameter"),
    ("i n, o i -> n o", {}, "batch index 'n' must be the first input axis"),
    ("n i i, o i -> n o", {}, "'i' appears twice"),
])
def test_contradictions_are_rejected_by_name(eq, kwargs, needle):
    with pytest.raises(SpecError, match=None) as info:
        LayerSpec.parse(eq, **kwargs)
    assert needle in str(info.value)


def test_unknown_constant_is_named_with_the_known_ones():
    with pytest.raises(SpecError) as info:
        LayerSpec.parse(CONV, maps=CONV_MAPS, constants={"sh": 1})
    assert "unknown symbol 'dh'" in str(info.value) and "'sh'" in str(info.value)


def test_specs_are_hashable_and_equal_by_value():
    a = LayerSpec.parse(CONV, maps=CONV_MAPS, constants=CONSTS)
    b = LayerSpec.parse(CONV, maps=CONV_MAPS, constants=CONSTS)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
