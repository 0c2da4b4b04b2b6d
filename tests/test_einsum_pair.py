"""``codegen.einsum.contract`` against torch.einsum in float64: every index role of a pairwise product
(batch, contracted, kept on either side, summed in one operand only), operands in any memory layout
(transposed views included), and the one-operand sums."""
import torch
from hypothesis import given, settings, strategies as st

from tengrad.codegen.einsum import contract, equation

LETTERS = "abcdef"


@st.composite
def products(draw):
    ia = tuple(draw(st.permutations(LETTERS))[:draw(st.integers(0, 4))])
    ib = tuple(draw(st.permutations(LETTERS))[:draw(st.integers(0, 4))])
    pool = list(dict.fromkeys(ia + ib))
    out = tuple(draw(st.permutations(pool))[:draw(st.integers(0, len(pool)))]) if pool else ()
    sizes = {c: draw(st.integers(1, 4)) for c in LETTERS}
    layouts = (draw(st.permutations(range(len(ia)))), draw(st.permutations(range(len(ib)))))
    return ia, ib, out, sizes, layouts, draw(st.integers(0, 2**31 - 1))


def _tensor(idx, sizes, layout, gen):
    """Random [sizes of idx] float64 whose memory is laid out in the order ``layout`` (a strided view)."""
    shape = [sizes[i] for i in idx]
    t = torch.randn([shape[d] for d in layout], dtype=torch.float64, generator=gen)
    return t.permute([list(layout).index(d) for d in range(len(idx))])


@settings(max_examples=400, deadline=None)
@given(products())
def test_pair_matches_torch_einsum(case):
    ia, ib, out, sizes, layouts, seed = case
    gen = torch.Generator().manual_seed(seed)
    a, b = _tensor(ia, sizes, layouts[0], gen), _tensor(ib, sizes, layouts[1], gen)
    want = torch.einsum(equation(out, ia, ib), a, b)
    got = contract(out, (a, ia), (b, ib))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(products())
def test_one_operand_sum_matches_torch_einsum(case):
    ia, _, out, sizes, layouts, seed = case
    out = tuple(i for i in out if i in ia)
    a = _tensor(ia, sizes, layouts[0], torch.Generator().manual_seed(seed))
    torch.testing.assert_close(contract(out, (a, ia)), torch.einsum(equation(out, ia), a), rtol=1e-12, atol=1e-12)


def test_repeated_index_falls_back_to_torch_einsum():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, 4, dtype=torch.float64, generator=gen)
    b = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(contract(("j",), (a, ("i", "i", "k")), (b, ("k", "j"))),
                               torch.einsum("iik,kj->j", a, b))
