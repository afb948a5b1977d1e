"""pytest-benchmark view of bench/fused_cpu.py: one fused greedy step (backends cpp and
reference), the plain PyTorch loop it replaces, and the step's GEMM floor.

    python -m pytest bench/test_fused_cpu.py --benchmark-only
"""
import pytest
import torch

from fused_cpu import VARIANTS
from localprop.ops import backends

HAS_CPP = backends.why_unavailable("cpp", torch.device("cpu")) is None


@pytest.mark.parametrize("width", [256, 512, 1024])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_step(benchmark, variant, width):
    if variant == "fused_cpp" and not HAS_CPP:
        pytest.skip(backends.why_unavailable("cpp", torch.device("cpu")))
    benchmark.group = f"greedy step, width {width}"
    step = VARIANTS[variant](width)
    benchmark.pedantic(step, warmup_rounds=3, rounds=20)
