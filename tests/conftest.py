import functools
import os

import pytest
import torch

# Without CUDA, Triton kernels run in Triton's interpreter, which is chosen when a kernel
# is first imported: set it before any test module can import localprop.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import localprop as lp


def mlp_nodes(sizes, dtype=torch.float32, activation="relu"):
    """lp.mlp_nodes with the positional dtype and activation the tests pass: LocalLinear
    nodes for layer sizes [in, h1, ..., out]; the last has no activation."""
    return lp.mlp_nodes(sizes, activation=activation, dtype=dtype)


SGD = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global RNG state, whatever ran before it, so a
    test's random inputs and initial weights are the same on every run."""
    torch.manual_seed(0)


@pytest.fixture
def batch():
    """A fresh random batch: x float32 [13, 9], y in [0, 5)."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(13, 9, generator=gen), torch.randint(0, 5, (13,), generator=gen)
