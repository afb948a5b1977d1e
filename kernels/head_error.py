"""Triton head and error of a node: logits = h Aᵀ + c (or h), softmax cross-entropy with
dlogits = (softmax - onehot) / B written directly (no probabilities tensor), the error
ε = (dlogits A) ⊙ σ'(z) and the message ε W. Registered as
``localprop::head_error_triton`` with the contract of ``localprop::head_error``.

Three kernels, because each step is a reduction over what the previous one finishes:
the softmax needs every class of a row before any dlogit is known, g = dlogits A needs
every class for each column, and ε W needs every column of ε.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from localprop.kernels.summation import compensated, dot_add
from localprop.ops.activation import GELU, NONE, RELU, SIGMOID, TANH

# The activation codes (localprop/ops/activation.py) as the constexpr globals that
# @triton.jit code may read.
_RELU, _TANH, _SIGMOID, _GELU = tl.constexpr(RELU), tl.constexpr(TANH), tl.constexpr(SIGMOID), tl.constexpr(GELU)


@triton.jit
def _softmax_ce_kernel(
    h_ptr,     # [B, N] node output, strides (stride_hb, stride_hn)
    a_ptr,     # [C, N] head weight A, strides (stride_ac, stride_an); read only when HAS_HEAD
    c_ptr,     # [C] head bias, stride stride_c; read only when HAS_HEAD_BIAS
    y_ptr,     # [B] int64 labels, stride stride_y
    dl_ptr,    # [B, C] output dlogits in h's dtype, contiguous; holds the logits in between
    loss_ptr,  # [B] output per-row cross-entropy in ACC_DTYPE
    B, N, C,
    stride_hb, stride_hn, stride_ac, stride_an, stride_c, stride_y,
    HAS_HEAD: tl.constexpr,       # False: h itself is the logits (C == N)
    HAS_HEAD_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,      # float32, or float64 for float64 inputs
    COMPENSATE: tl.constexpr,     # Kahan-sum the head's N tiles (kernels/summation.py)
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    label = tl.load(y_ptr + rows * stride_y, mask=row_ok, other=-1)
    ks = tl.arange(0, BLOCK_K)
    # Pass 1: logits tile by tile (stored in dl_ptr), with an online max and sum of exp.
    row_max = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    row_sum = tl.zeros((BLOCK_M,), ACC_DTYPE)
    target = tl.zeros((BLOCK_M,), ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        inside = row_ok[:, None] & (cls[None, :] < C)
        if HAS_HEAD:
            acc = tl.zeros((BLOCK_M, BLOCK_C), ACC_DTYPE)
            comp = tl.zeros((BLOCK_M, BLOCK_C), ACC_DTYPE)
            for k0 in range(0, N, BLOCK_K):
                kk = k0 + ks
                h = tl.load(h_ptr + rows[:, None] * stride_hb + kk[None, :] * stride_hn,
                            mask=row_ok[:, None] & (kk[None, :] < N), other=0.0)
                at = tl.load(a_ptr + cls[None, :] * stride_ac + kk[:, None] * stride_an,
                             mask=(cls[None, :] < C) & (kk[:, None] < N), other=0.0)
                acc, comp = dot_add(h, at.to(h.dtype), acc, comp, ACC_DTYPE, COMPENSATE)
            if HAS_HEAD_BIAS:
                acc += tl.load(c_ptr + cls * stride_c, mask=cls < C, other=0.0).to(ACC_DTYPE)[None, :]
        else:
            acc = tl.load(h_ptr + rows[:, None] * stride_hb + cls[None, :] * stride_hn,
                          mask=inside, other=0.0).to(ACC_DTYPE)
        # Round to the output dtype first, as PyTorch's logits are, so that both passes
        # see the same values.
        logits = acc.to(dl_ptr.dtype.element_ty)
        tl.store(dl_ptr + rows[:, None] * C + cls[None, :], logits, mask=inside)
        # Only classes past C are masked out: rows past B hold finite logits (their
        # loads gave 0), so no -inf - -inf = NaN arises anywhere; they are never stored.
        logits = tl.where(cls[None, :] < C, logits.to(ACC_DTYPE), float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        row_max = new_max
        target += tl.sum(tl.where(cls[None, :] == label[:, None], logits, 0.0), axis=1)
    # (max - target) first: adding log(sum) to the max before subtracting would round away
    # a loss far below the logits' ulp (confident predictions; a loss of 1e-7 read as 0)
    tl.store(loss_ptr + rows, (row_max - target) + tl.log(row_sum), mask=row_ok)
    # Pass 2: dlogits = (softmax - onehot) / B over the stored logits, in place.
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        inside = row_ok[:, None] & (cls[None, :] < C)
        ptrs = dl_ptr + rows[:, None] * C + cls[None, :]
        logits = tl.load(ptrs, mask=inside, other=0.0).to(ACC_DTYPE)
        p = tl.exp(logits - row_max[:, None]) / row_sum[:, None]
        p = tl.where(cls[None, :] == label[:, None], p - 1.0, p) / B
        tl.store(ptrs, p.to(dl_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _grad_matmul_kernel(
    x_ptr,    # [B, R] left factor (dlogits or ε), strides (stride_xb, stride_xr)
    m_ptr,    # [R, N] right factor (A or W), strides (stride_mr, stride_mn); read only when HAS_RIGHT
    h_ptr,    # [B, N] node output (tanh, sigmoid: σ' from h), strides (stride_hb, stride_hn)
    aux_ptr,  # RELU: uint8 [B, ceil(N/8)] mask; GELU: [B, N] z; strides (stride_auxb, stride_auxn)
    out_ptr,  # [B, N] output (x m) ⊙ σ'(z), contiguous
    B, N, R,
    stride_xb, stride_xr, stride_mr, stride_mn, stride_hb, stride_hn, stride_auxb, stride_auxn,
    HAS_RIGHT: tl.constexpr,   # False: the product is x itself (R == N), no head
    ACTIVATION: tl.constexpr,  # code of localprop/ops/activation.py; NONE for the message ε W
    ACC_DTYPE: tl.constexpr,
    COMPENSATE: tl.constexpr,  # Kahan-sum the R tiles (kernels/summation.py)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rows[:, None] < B) & (cols[None, :] < N)
    if HAS_RIGHT:
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
        comp = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
        for k0 in range(0, R, BLOCK_K):
            kk = k0 + ks
            x = tl.load(x_ptr + rows[:, None] * stride_xb + kk[None, :] * stride_xr,
                        mask=(rows[:, None] < B) & (kk[None, :] < R), other=0.0)
            m = tl.load(m_ptr + kk[:, None] * stride_mr + cols[None, :] * stride_mn,
                        mask=(kk[:, None] < R) & (cols[None, :] < N), other=0.0)
            acc, comp = dot_add(x, m.to(x.dtype), acc, comp, ACC_DTYPE, COMPENSATE)
        g = acc  # kept unrounded through the epilogue: one rounding fewer than PyTorch
    else:
        g = tl.load(x_ptr + rows[:, None] * stride_xb + cols[None, :] * stride_xr,
                    mask=inside, other=0.0).to(ACC_DTYPE)
    if ACTIVATION == _RELU:
        byte = tl.load(aux_ptr + rows[:, None] * stride_auxb + (cols // 8)[None, :] * stride_auxn,
                       mask=inside, other=0)
        g = tl.where(((byte.to(tl.int32) >> (cols % 8)[None, :]) & 1) != 0, g, 0.0)
    if ACTIVATION == _TANH or ACTIVATION == _SIGMOID:
        h = tl.load(h_ptr + rows[:, None] * stride_hb + cols[None, :] * stride_hn,
                    mask=inside, other=0.0).to(ACC_DTYPE)
        if ACTIVATION == _TANH:
            g = g * (1.0 - h * h)
        else:
            g = g * (h * (1.0 - h))
    if ACTIVATION == _GELU:
        z = tl.load(aux_ptr + rows[:, None] * stride_auxb + cols[None, :] * stride_auxn,
                    mask=inside, other=0.0).to(ACC_DTYPE)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        g = g * (cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327)  # 1/sqrt(2 pi)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], g.to(out_ptr.dtype.element_ty), mask=inside)


def _block(n: int, cap: int) -> int:
    """A power-of-two tile edge covering n, between 16 (tl.dot's minimum) and cap."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _acc_dtype(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _grad_matmul(x, right, h, aux, activation, out):
    """out = (x right) ⊙ σ'(z), or x ⊙ σ'(z) when right is None; out is [B, N] contiguous."""
    rows, n = out.shape
    r = x.shape[1]
    aux2 = aux if aux.dim() == 2 else h  # a placeholder pointer when nothing is kept
    m = x if right is None else right
    block_m, block_n, block_k = _block(rows, 64), _block(n, 64), _block(r, 32)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n))
    wrap_triton(_grad_matmul_kernel)[grid](
        x, m, h, aux2, out, rows, n, r,
        x.stride(0), x.stride(1), m.stride(0), m.stride(1), h.stride(0), h.stride(1),
        aux2.stride(0), aux2.stride(1),
        HAS_RIGHT=right is not None, ACTIVATION=activation, ACC_DTYPE=_acc_dtype(x), COMPENSATE=compensated(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)


@triton_op("localprop::head_error_triton", mutates_args=())
def head_error(h: torch.Tensor, aux: torch.Tensor, head_weight: torch.Tensor | None,
               head_bias: torch.Tensor | None, y: torch.Tensor, activation: int,
               weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head cross-entropy and node error on CUDA tensors (CPU under TRITON_INTERPRET=1).

    h: [B, N] float; aux: what the transform kept for ``activation`` (code of
    localprop/ops/activation.py); head_weight A: [C, N] and head_bias c: [C] (or None), or
    A None when h is the logits; y: int64 [B]; weight W: [N, K] or None. Any strides.
    Returns loss [] (mean cross-entropy), dlogits [B, C], err [B, N] and message [B, K]
    (an empty tensor without W), all in h's dtype, none aliasing another.
    """
    rows, n = h.shape
    classes = n if head_weight is None else head_weight.shape[0]
    if head_weight is not None and head_weight.shape[1] != n:
        raise ValueError(f"head_error: h is [{rows}, {n}] but head_weight is {list(head_weight.shape)}")
    dlogits = h.new_empty(rows, classes)
    row_loss = h.new_empty(rows, dtype=torch.float64 if h.dtype == torch.float64 else torch.float32)
    a = h if head_weight is None else head_weight
    c = a if head_bias is None else head_bias
    block_m, block_c, block_k = _block(rows, 32), _block(classes, 64), _block(n, 32)
    wrap_triton(_softmax_ce_kernel)[(triton.cdiv(rows, block_m),)](
        h, a, c, y, dlogits, row_loss, rows, n, classes,
        h.stride(0), h.stride(1), a.stride(0), a.stride(1), c.stride(0), y.stride(0),
        HAS_HEAD=head_weight is not None, HAS_HEAD_BIAS=head_bias is not None,
        ACC_DTYPE=_acc_dtype(h), COMPENSATE=compensated(h.dtype), BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_K=block_k)
    # The mean of B per-row losses: one small torch reduction, cheaper than a kernel launch
    # that would have to wait for every row program anyway.
    loss = (row_loss.sum() / rows).to(h.dtype)
    err = h.new_empty(rows, n)
    _grad_matmul(dlogits, head_weight, h, aux, activation, err)
    if weight is None:
        return loss, dlogits, err, h.new_empty(0)
    message = h.new_empty(rows, weight.shape[1])
    _grad_matmul(err, weight, h, aux, NONE, message)
    return loss, dlogits, err, message


@head_error.register_fake
def _(h, aux, head_weight, head_bias, y, activation, weight):
    # Explicit, because triton_op's traced body would run the kernels themselves under
    # TRITON_INTERPRET (wrap_triton does not intercept interpreted kernels).
    rows, n = h.shape
    classes = n if head_weight is None else head_weight.shape[0]
    message = h.new_empty(0) if weight is None else h.new_empty(rows, weight.shape[1])
    return h.new_empty(()), h.new_empty(rows, classes), h.new_empty(rows, n), message
