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
