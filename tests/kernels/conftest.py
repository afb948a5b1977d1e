"""Without CUDA the Triton kernels run on CPU tensors in Triton's interpreter, which is
chosen when a kernel is decorated: TRITON_INTERPRET must be set before triton and the
kernel modules are first imported, hence here, at import time."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poison():
    """Fill every tensor torch.empty makes with NaN (integers: their maximum) during the
    test, so an output element a kernel never writes shows up in the comparisons."""
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old[0])
    torch.utils.deterministic.fill_uninitialized_memory = old[1]
