"""Triton transform of a linear node: z = u Wᵀ + b, h = σ(z), in one GEMM whose epilogue
applies σ and writes what the error step needs: the packed 1-bit ReLU mask (whole bytes
per program), or z for GELU. Registered as ``localprop::transform_triton`` with the
contract of ``localprop::transform`` (see csrc/localprop.cpp)."""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from localprop.kernels.summation import compensated, dot_add
from localprop.ops.activation import GELU, RELU, SIGMOID, TANH

# The activation codes (localprop/ops/activation.py) as the constexpr globals that
# @triton.jit code may read.
_RELU, _TANH, _SIGMOID, _GELU = tl.constexpr(RELU), tl.constexpr(TANH), tl.constexpr(SIGMOID), tl.constexpr(GELU)


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    """σ(z) in z's (accumulator) precision, the same functions as torch.nn.functional."""
    if ACTIVATION == _RELU:
        return tl.where(z <= 0, 0.0, z)  # NaN stays NaN, as torch.relu
    if ACTIVATION == _TANH:
        # tl.math has no tanh that the interpreter also runs. (1 - e) / (1 + e) with
        # e = exp(-2|z|) <= 1 never overflows and is within an ulp of 1 in absolute terms;
        # below |z| = 2^-6, where its relative error would grow, the odd Taylor series
        # to z^9 is exact to float64 rounding.
        a = tl.abs(z)
        e = tl.exp(-2.0 * a)
        a2 = a * a
        series = a * (1.0 - a2 * (1.0 / 3.0 - a2 * (2.0 / 15.0 - a2 * (17.0 / 315.0 - a2 * (62.0 / 2835.0)))))
        th = tl.where(a < 0.015625, series, (1.0 - e) / (1.0 + e))
        return tl.where(z < 0, -th, th)
    if ACTIVATION == _SIGMOID:
        return 1.0 / (1.0 + tl.exp(-z))
    if ACTIVATION == _GELU:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return z


@triton.jit
def _transform_kernel(
    u_ptr,    # [B, K] input, strides (stride_ub, stride_uk)
    w_ptr,    # [N, K] weight, strides (stride_wn, stride_wk); cast to u's dtype for tl.dot
    b_ptr,    # [N] bias, stride stride_b; read only when HAS_BIAS
    h_ptr,    # [B, N] output σ(z) in u's dtype, contiguous
    aux_ptr,  # RELU: uint8 [B, ceil(N/8)] packed mask; GELU: [B, N] z; contiguous; else unused
    B, N, K,
    stride_ub, stride_uk, stride_wn, stride_wk, stride_b,
    ACTIVATION: tl.constexpr,  # code of localprop/ops/activation.py
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,   # float32, or float64 for float64 inputs
    COMPENSATE: tl.constexpr,  # Kahan-sum the K tiles (kernels/summation.py)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    comp = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        u = tl.load(u_ptr + rows[:, None] * stride_ub + kk[None, :] * stride_uk,
                    mask=(rows[:, None] < B) & (kk[None, :] < K), other=0.0)
        # W tile loaded transposed ([BLOCK_K, BLOCK_N]) by its strides, so no copy of W
        wt = tl.load(w_ptr + cols[None, :] * stride_wn + kk[:, None] * stride_wk,
                     mask=(cols[None, :] < N) & (kk[:, None] < K), other=0.0)
        acc, comp = dot_add(u, wt.to(u.dtype), acc, comp, ACC_DTYPE, COMPENSATE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols * stride_b, mask=cols < N, other=0.0).to(ACC_DTYPE)[None, :]
    # Columns past N hold z = 0 (masked loads), so their mask bits come out 0 as the
    # reference's padding; rows past B are never stored.
    z = acc
    h = _activate(z, ACTIVATION)
    inside = (rows[:, None] < B) & (cols[None, :] < N)
    tl.store(h_ptr + rows[:, None] * N + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=inside)
    if ACTIVATION == _RELU:
        # 8 columns -> 1 byte: shift each bit to its place and sum the 8 groups of 8
        bits = (z > 0).to(tl.int32) << (tl.arange(0, BLOCK_N) % 8)[None, :]
        packed = tl.sum(tl.reshape(bits, (BLOCK_M, BLOCK_N // 8, 8)), axis=2).to(tl.uint8)
        nbytes = (N + 7) // 8
        bytes_ = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        tl.store(aux_ptr + rows[:, None] * nbytes + bytes_[None, :], packed,
                 mask=(rows[:, None] < B) & (bytes_[None, :] < nbytes))
    if ACTIVATION == _GELU:
        tl.store(aux_ptr + rows[:, None] * N + cols[None, :], z.to(aux_ptr.dtype.element_ty), mask=inside)


def _block(n: int, cap: int) -> int:
    """A power-of-two tile edge covering n, between 16 (tl.dot's minimum) and cap."""
    return max(16, min(cap, triton.next_power_of_2(n)))


@triton_op("localprop::transform_triton", mutates_args=())
def transform(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              activation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z = u Wᵀ + b, h = σ(z) on CUDA tensors (CPU tensors under TRITON_INTERPRET=1).

    u: [B, K] float; weight: [N, K]; bias: [N] or None, any strides; activation: code of
    localprop/ops/activation.py. Returns h: [B, N] in u's dtype and aux: uint8 [B, ceil(N/8)] ReLU
    mask (bit j of byte i = column 8i+j), [B, N] z in u's dtype for GELU, else an empty tensor.
    """
    (rows, k), n = u.shape, weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"transform: u is [{rows}, {k}] but weight is {list(weight.shape)}")
    h = u.new_empty(rows, n)
    if activation == RELU:
        aux = u.new_empty(rows, (n + 7) // 8, dtype=torch.uint8)
    elif activation == GELU:
        aux = u.new_empty(rows, n)
    else:
        aux = u.new_empty(0)
    block_m, block_n, block_k = _block(rows, 64), _block(n, 64), _block(k, 32)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n))
    wrap_triton(_transform_kernel)[grid](
        u, weight, weight if bias is None else bias, h, aux if aux.numel() else h,
        rows, n, k, u.stride(0), u.stride(1), weight.stride(0), weight.stride(1),
        0 if bias is None else bias.stride(0),
        ACTIVATION=activation, HAS_BIAS=bias is not None,
        ACC_DTYPE=tl.float64 if u.dtype == torch.float64 else tl.float32, COMPENSATE=compensated(u.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return h, aux


@transform.register_fake
def _(u, weight, bias, activation):
    # Explicit, because triton_op's traced body would run the kernel itself under
    # TRITON_INTERPRET (wrap_triton does not intercept interpreted kernels).
    rows, n = u.shape[0], weight.shape[0]
    if activation == RELU:
        return u.new_empty(rows, n), u.new_empty(rows, (n + 7) // 8, dtype=torch.uint8)
    return u.new_empty(rows, n), u.new_empty(rows, n) if activation == GELU else u.new_empty(0)
