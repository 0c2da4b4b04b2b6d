"""Which blocks took part in a step (curvature/usage.py): the batched check ``unused_all`` against the
definition, block by block, on every kind of gradient a step can see."""
import torch

from tengrad.optim.curvature import usage


class _Record:
    def __init__(self, grad=None, rows=None):
        self.grad, self.rows = grad, rows


def _param(grad):
    dense = grad is not None and grad.layout == torch.strided
    p = torch.nn.Parameter(torch.ones(grad.shape if dense else (6, 3),
                                      dtype=grad.dtype if grad is not None else torch.float32))
    p.grad = grad
    return p


def _by_definition(params, record):
    """The rule of usage.py's docstring, one block, read off the whole gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return usage.NO_GRADIENT
    captured = record is not None and (record.grad is not None or record.rows)
    if not captured and not any(bool((g.to_dense() if g.is_sparse else g).ne(0).any()) for g in grads):
        return usage.ZERO_GRADIENT
    return None


def test_unused_all_matches_the_definition_on_every_kind_of_gradient():
    gen = torch.Generator().manual_seed(0)
    big_tail = torch.zeros(5000)
    big_tail[4500] = 0.25                                   # zero head (first 4096), non-zero tail
    nan = torch.zeros(7)
    nan[3] = float("nan")
    strided = torch.randn(8, 6, generator=gen).t()          # not contiguous
    sparse = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.randn(1, 3, generator=gen), (6, 3),
                                     check_invariants=True)
    blocks = [
        ([_param(None)], None),                                          # no gradient
        ([_param(torch.zeros(4, 3))], None),                             # zero, no capture: skipped
        ([_param(torch.zeros(4, 3))], _Record(grad=torch.ones(1))),      # zero but captured: takes part
        ([_param(torch.zeros(4, 3))], _Record(rows=[1])),
        ([_param(torch.randn(4, 3, generator=gen))], None),              # non-zero
        ([_param(big_tail)], None),
        ([_param(torch.zeros(5000))], None),                             # long and all zero
        ([_param(nan)], None),                                           # NaN takes part (reported later)
        ([_param(strided)], None),
        ([_param(torch.zeros(6, 8).t())], None),
        ([_param(sparse)], None),
        ([_param(torch.zeros(0))], None),                                # empty
        ([_param(torch.zeros(3, dtype=torch.float64)), _param(torch.randn(2, generator=gen, dtype=torch.bfloat16))],
         None),                                                          # mixed dtypes, one non-zero
        ([_param(None), _param(torch.zeros(2))], None),
    ]
    got = usage.unused_all(blocks)
    want = [_by_definition(p, r) for p, r in blocks]
    assert got == want
    assert want.count(None) == 8 and want.count(usage.ZERO_GRADIENT) == 5     # the cases are what they say
    assert [usage.unused(p, r) for p, r in blocks] == want


def test_a_gradient_made_by_this_backward_took_part_and_is_not_read():
    """usage.Seen: a new .grad tensor (autograd made it: the parameter was reached) takes part even when
    zero; the tensor the last step saw (kept: zero_grad(set_to_none=False)) is read, as before."""
    seen = usage.Seen()
    zero = _param(torch.zeros(4, 3))
    moving = _param(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    blocks = [([zero], None), ([moving], None)]
    assert usage.unused_all(blocks, seen) == [None, None]          # first sight: both made by the backward
    assert usage.unused_all(blocks, seen) == [usage.ZERO_GRADIENT, None]   # the same tensors: read
    zero.grad = torch.zeros(4, 3)                                    # a new tensor: this backward's
    assert usage.unused_all(blocks, seen) == [None, None]
    zero.grad.zero_()                                                # kept in place again: read
    assert usage.unused_all(blocks, seen) == [usage.ZERO_GRADIENT, None]
    assert usage.unused_all([([_param(None)], None)], seen) == [usage.NO_GRADIENT]


def _reached_with_a_zero_gradient(set_to_none: bool):
    """Reuse steps of a net whose second head is reached by the backward with an exactly zero gradient
    (its output times 0): (opt, the head's weight before and after the last step)."""
    import warnings
    from torch import nn
    from tengrad.optim import TENGraD

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head_a, self.head_b = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x, b_weight):
            h = torch.tanh(self.body(x))
            return self.head_a(h) + b_weight * self.head_b(h)
    torch.manual_seed(0)
    model = Net().double()
    head_b = model.head_b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = TENGraD(model, 0.2, 0.5, momentum=0.9, update_freq=10)
    gen = torch.Generator().manual_seed(1)
    for s in range(4):
        x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (5,), generator=gen)
        out = model(x, 0.0 if s >= 1 else 1.0)                       # head_b: gradient 0 from step 1 on
        opt.zero_grad(set_to_none=set_to_none)
        torch.nn.functional.cross_entropy(out, y).backward()
        before = head_b.weight.detach().clone()
        opt.step()
    return opt, before, head_b.weight.detach().clone()


def test_a_module_reached_with_a_zero_gradient_is_stepped_like_sgd_unless_its_gradient_was_kept():
    opt, before, after = _reached_with_a_zero_gradient(set_to_none=True)
    assert "head_b" not in opt.skipped
    assert not torch.equal(before, after)           # momentum carries it on, as torch.optim.SGD would
    opt, before, after = _reached_with_a_zero_gradient(set_to_none=False)
    assert "zero gradient and no captured forward" in opt.skipped["head_b"]
    assert torch.equal(before, after)
