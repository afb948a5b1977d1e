"""Long reductions of the Triton kernels keep float32 precision: the tiles of a reduction
are summed with compensation (kernels/summation.py), so the error does not grow with the
number of tiles.

The inputs make a plain running sum lose everything after its first term: one 1 and then
terms of 2^-30, so that each tile of them (32 terms, 2^-25) is below half an ulp of 1 and
a sum that adds tile after tile to 1 stays at 1, 7.8 ulps from the exact sum. The first
tile's own rounding (31 terms lost inside it, 0.24 ulp) is the kernel's error left.
"""
import torch

from localprop.ops.activation import NONE
from tests.ops.cases import backend_param, device, kernels

LENGTH = 1000           #: terms reduced: 31 tiles and a part of one
TINY = 2.0 ** -30       #: every term after the first
ULP = 2.0 ** -23        #: of float32 at 1
EXACT = 1.0 + (LENGTH - 1) * TINY


def leading_one(backend) -> torch.Tensor:
    """float32 [LENGTH]: 1, then LENGTH - 1 terms of TINY, on the backend's device."""
    t = torch.full((LENGTH,), TINY)
    t[0] = 1.0
    return t.to(device(backend))


@backend_param(names=("triton",))
def test_transform_sums_a_long_reduction_to_float32_precision(backend):
    u = leading_one(backend)[None, :]
    w = torch.ones(3, LENGTH, device=device(backend))
    h, _ = kernels(backend).transform(u, w, None, NONE)
    assert (h.double().cpu() - EXACT).abs().max().item() <= ULP


@backend_param(names=("triton",))
def test_update_sums_a_long_batch_to_float32_precision(backend):
    """The weight's and the bias's gradient, each reduced over a batch of LENGTH rows."""
    err = leading_one(backend)[:, None]
    inp = torch.ones(LENGTH, 2, device=device(backend))
    w, b = torch.zeros(1, 2, device=device(backend)), torch.zeros(1, device=device(backend))
    for param, x in ((w, inp), (b, None)):
        # plain SGD with lr 1 from zero: the parameter becomes minus the gradient
        kernels(backend).sgd_update_(param, err, x, None, 1.0, 0.0, 0.0, 0.0, False, False, False)
        assert (param.double().cpu() + EXACT).abs().max().item() <= ULP
