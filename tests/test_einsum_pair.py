"""``codegen.einsum.contract`` against torch.einsum in float64: every index role of a pairwise product
(batch, contracted, kept on either side, summed in one operand only), operands in any memory layout
(transposed views included), and the one-operand sums."""
import torch
from hypothesis import given, settings, strategies as st

from tengrad.codegen.einsum import Add, contract, equation

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
    c = torch.randn(want.shape, dtype=torch.float64, generator=gen)       # + beta c (an addmm when one mm)
    torch.testing.assert_close(contract(out, (a, ia), (b, ib), add=Add(c, 0.37)), want + 0.37 * c,
                               rtol=1e-12, atol=1e-12)
    buf = torch.full(want.shape, float("nan"), dtype=torch.float64)      # written into a kept buffer
    got = contract(out, (a, ia), (b, ib), add=Add(c, 0.37, buf))
    torch.testing.assert_close(got, want + 0.37 * c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(buf, want + 0.37 * c, rtol=1e-12, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(products())
def test_one_operand_sum_matches_torch_einsum(case):
    ia, _, out, sizes, layouts, seed = case
    out = tuple(i for i in out if i in ia)
    a = _tensor(ia, sizes, layouts[0], torch.Generator().manual_seed(seed))
    torch.testing.assert_close(contract(out, (a, ia)), torch.einsum(equation(out, ia), a), rtol=1e-12, atol=1e-12)



def test_bound_vjp_with_add_is_vjp_plus_beta_times_the_tensors():
    """CompiledLayer.bound(x, gy).vjp(u, add, beta) == vjp(u) + beta * add, per parameter, on a Linear
    over tokens (the addmm path) and a Conv2d (its weight gradient, then one addition)."""
    import tengrad
    gen = torch.Generator().manual_seed(1)
    for module, x_shape, gy_shape in ((torch.nn.Linear(6, 5), (4, 3, 6), (4, 3, 5)),
                                      (torch.nn.Conv2d(2, 3, 3, padding=1), (4, 2, 5, 5), (4, 3, 5, 5))):
        module = module.double()
        plan = tengrad.compile(module)
        x = torch.randn(x_shape, dtype=torch.float64, generator=gen)
        gy = torch.randn(gy_shape, dtype=torch.float64, generator=gen)
        u = torch.randn(4, dtype=torch.float64, generator=gen)
        c = [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in module.parameters()]
        plain = plan.vjp(x, gy, u)
        added = plan.bound(x, gy).vjp(u, c, 0.25)
        bufs = [torch.full_like(ci, float("nan")) for ci in c]
        into = plan.bound(x, gy).vjp(u, c, 0.25, bufs)
        for want, ci, got, got_into, buf in zip(plain, c, added, into, bufs):
            torch.testing.assert_close(got, want + 0.25 * ci, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got_into, want + 0.25 * ci, rtol=1e-12, atol=1e-12)
            assert got_into.data_ptr() == buf.data_ptr()


def test_repeated_index_falls_back_to_torch_einsum():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, 4, dtype=torch.float64, generator=gen)
    b = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(contract(("j",), (a, ("i", "i", "k")), (b, ("k", "j"))),
                               torch.einsum("iik,kj->j", a, b))


def test_add_goes_into_the_product_in_either_layout():
    """out = (o, i) and (i, o) of a[n, o] b[n, i]: both take the addmm (written into the kept buffer)."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    b = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    for out in (("o", "i"), ("i", "o")):
        want = torch.einsum(equation(out, ("n", "o"), ("n", "i")), a, b)
        c = torch.randn(want.shape, dtype=torch.float64, generator=gen)
        buf = torch.empty_like(c)
        got = contract(out, (a, ("n", "o")), (b, ("n", "i")), add=Add(c, -0.5, buf))
        torch.testing.assert_close(got, want - 0.5 * c, rtol=1e-12, atol=1e-12)
        assert got.data_ptr() == buf.data_ptr()
