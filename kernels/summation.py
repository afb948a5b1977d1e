"""Compensated accumulation over the tiles of a reduction, shared by the Triton kernels.

``tl.dot(a, b, acc)`` accumulates every tile's products into the one running ``acc``, so
an output reduced over K carries roundings all along K. On an H200, at K = 1000, the
float32 transform came out 2.5-5x less accurate than PyTorch's own cuBLAS result, past the
op tests' bound of twice PyTorch's error. Here each tile's product starts from zero (a
chain of one tile's length) and is added to the running sum with Kahan's compensation, so
the error no longer grows with the number of tiles. Inputs of 16 bits skip it: their
result's rounding to 16 bits outweighs any float32 chain, and their tensor-core dot is
cheap next to the extra element-wise work.
"""
import torch
import triton
import triton.language as tl


def compensated(dtype: torch.dtype) -> bool:
    """Whether a reduction over inputs of ``dtype`` is summed with compensation."""
    return dtype in (torch.float32, torch.float64)


@triton.jit
def add_compensated(acc, comp, part):
    """(acc + part, the compensation for the next addition): Kahan's summation step.
    ``comp`` holds minus what the additions so far have rounded away."""
    y = part - comp
    total = acc + y
    return total, (total - acc) - y


@triton.jit
def dot_add(a, b, acc, comp, ACC_DTYPE: tl.constexpr, COMPENSATE: tl.constexpr):
    """(acc + a b, compensation): the tile product a b in IEEE precision (fp32 must not
    drop to tf32: torch's fp32 matmul does not), added with compensation when COMPENSATE,
    else accumulated by the dot itself (comp is then returned unchanged)."""
    if COMPENSATE:
        part = tl.dot(a, b, input_precision="ieee", out_dtype=ACC_DTYPE)
        return add_compensated(acc, comp, part)
    else:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC_DTYPE), comp
