"""Triton local updates: W <- optimizer step with dW = errᵀ inp computed tile by tile
(tl.dot over the batch) and the optimizer applied to that tile of W and of its state in
the GEMM epilogue, so the gradient is never materialised; a bias (inp None) takes
db = Σ_b err through the same epilogue. SGD (momentum, dampening, Nesterov, weight decay,
maximize) and Adam/AdamW with torch.optim's single-tensor semantics. Registered as
``localprop::sgd_update_triton`` and ``localprop::adam_update_triton`` with the contracts
of ``localprop::sgd_update_`` and ``localprop::adam_update_`` (csrc/localprop.cpp).

The element-wise math is that of csrc/update_math.h (sgd_step, adam_step), which the C++
and CUDA ops share; Triton cannot include it, so the epilogues below spell out the same
formulas in the same order of operations (each step is marked with its line there).

Hyperparameters travel in a small float64 tensor, not as float arguments: Triton's
interpreter turns float arguments into float32, which would cost float64 parameters their
precision; the kernels round them to the parameter's compute dtype, as torch.optim's tensor
ops do with its Python floats. On a GPU that is one 64-byte host-to-device copy per call.
"""
import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from localprop.kernels.summation import add_compensated, compensated, dot_add


@triton.jit
def _grad_tile(
    err_ptr,  # [B, N] error at the map's output, strides (stride_eb, stride_en)
    inp_ptr,  # [B, K] the map's input, strides (stride_ib, stride_ik); read only when HAS_INP
    B, N, K, stride_eb, stride_en, stride_ib, stride_ik,
    rows,     # [BLOCK_N] indices into N of this tile
    cols,     # [BLOCK_K] indices into K of this tile
    HAS_INP: tl.constexpr,    # False: a bias, the gradient is Σ_b err (K == 1)
    DOT_DTYPE: tl.constexpr,  # common dtype of err and inp for tl.dot
    ACC_DTYPE: tl.constexpr,
    COMPENSATE: tl.constexpr,  # Kahan-sum the batch tiles (kernels/summation.py)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """The [BLOCK_N, BLOCK_K] tile of errᵀ inp, reduced over the batch in ACC_DTYPE."""
    acc = tl.zeros((BLOCK_N, BLOCK_K), ACC_DTYPE)
    comp = tl.zeros((BLOCK_N, BLOCK_K), ACC_DTYPE)
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        # err tile loaded transposed ([BLOCK_N, BLOCK_B]) by its strides, so no copy of errᵀ
        err_t = tl.load(err_ptr + rows[:, None] * stride_en + bs[None, :] * stride_eb,
                        mask=(rows[:, None] < N) & (bs[None, :] < B), other=0.0)
        if HAS_INP:
            x = tl.load(inp_ptr + bs[:, None] * stride_ib + cols[None, :] * stride_ik,
                        mask=(bs[:, None] < B) & (cols[None, :] < K), other=0.0)
            acc, comp = dot_add(err_t.to(DOT_DTYPE), x.to(DOT_DTYPE), acc, comp, ACC_DTYPE, COMPENSATE)
        elif COMPENSATE:
            acc, comp = add_compensated(acc, comp, tl.sum(err_t.to(ACC_DTYPE), axis=1)[:, None])
        else:
            acc += tl.sum(err_t.to(ACC_DTYPE), axis=1)[:, None]
    return acc


@triton.jit
def _sgd_kernel(
    p_ptr,    # [N, K] parameter (a bias: [N] seen as [N, 1]), strides (stride_pn, stride_pk), updated in place
    buf_ptr,  # momentum buffer like the parameter, strides (stride_bn, stride_bk); used only when MOMENTUM
    err_ptr, inp_ptr,  # the gradient's factors, see _grad_tile
    hyper_ptr,  # float64 [4]: lr, momentum, dampening, weight_decay
    B, N, K, stride_pn, stride_pk, stride_bn, stride_bk, stride_eb, stride_en, stride_ib, stride_ik,
    MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr,  # FIRST_STEP: the buffer starts as d_p
    NESTEROV: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_INP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, COMPENSATE: tl.constexpr,
    EPI_DTYPE: tl.constexpr,  # float32 (float64 for float64 params): the update's arithmetic
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (rows[:, None] < N) & (cols[None, :] < K)
    lr = tl.load(hyper_ptr).to(EPI_DTYPE)
    momentum = tl.load(hyper_ptr + 1).to(EPI_DTYPE)
    dampening = tl.load(hyper_ptr + 2)
    g = _grad_tile(err_ptr, inp_ptr, B, N, K, stride_eb, stride_en, stride_ib, stride_ik, rows, cols,
                   HAS_INP, DOT_DTYPE, ACC_DTYPE, COMPENSATE, BLOCK_N, BLOCK_K, BLOCK_B).to(EPI_DTYPE)
    p_ptrs = p_ptr + rows[:, None] * stride_pn + cols[None, :] * stride_pk
    p = tl.load(p_ptrs, mask=inside, other=0.0).to(EPI_DTYPE)
    # sgd_step of csrc/update_math.h from here on, g its d
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:  # d = d + weight_decay * p
        g = g + tl.load(hyper_ptr + 3).to(EPI_DTYPE) * p
    if MOMENTUM:  # b = first_step ? d : b * momentum + (1 - dampening) * d; d = nesterov ? d + momentum * b : b
        buf_ptrs = buf_ptr + rows[:, None] * stride_bn + cols[None, :] * stride_bk
        if FIRST_STEP:
            buf = g
        else:
            buf = tl.load(buf_ptrs, mask=inside, other=0.0).to(EPI_DTYPE)
            buf = buf * momentum + (1.0 - dampening).to(EPI_DTYPE) * g
        tl.store(buf_ptrs, buf.to(buf_ptr.dtype.element_ty), mask=inside)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p - lr * g  # p - lr * d
    tl.store(p_ptrs, p.to(p_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _adam_kernel(
    p_ptr,   # [N, K] parameter (a bias: [N] seen as [N, 1]), strides (stride_pn, stride_pk), updated in place
    m_ptr,   # exp_avg like the parameter, strides (stride_mn, stride_mk), updated in place
    v_ptr,   # exp_avg_sq like the parameter, strides (stride_vn, stride_vk), updated in place
    err_ptr, inp_ptr,  # the gradient's factors, see _grad_tile
    hyper_ptr,  # float64 [7]: 1 - beta1 (the lerp weight of exp_avg), beta2, eps, weight_decay,
                #   1 - lr * weight_decay (AdamW), lr / (1 - beta1^step), sqrt(1 - beta2^step)
    B, N, K, stride_pn, stride_pk, stride_mn, stride_mk, stride_vn, stride_vk,
    stride_eb, stride_en, stride_ib, stride_ik,
    WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_INP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, COMPENSATE: tl.constexpr, EPI_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (rows[:, None] < N) & (cols[None, :] < K)
    beta2 = tl.load(hyper_ptr + 1)
    g = _grad_tile(err_ptr, inp_ptr, B, N, K, stride_eb, stride_en, stride_ib, stride_ik, rows, cols,
                   HAS_INP, DOT_DTYPE, ACC_DTYPE, COMPENSATE, BLOCK_N, BLOCK_K, BLOCK_B).to(EPI_DTYPE)
    p_ptrs = p_ptr + rows[:, None] * stride_pn + cols[None, :] * stride_pk
    m_ptrs = m_ptr + rows[:, None] * stride_mn + cols[None, :] * stride_mk
    v_ptrs = v_ptr + rows[:, None] * stride_vn + cols[None, :] * stride_vk
    p = tl.load(p_ptrs, mask=inside, other=0.0).to(EPI_DTYPE)
    m = tl.load(m_ptrs, mask=inside, other=0.0).to(EPI_DTYPE)
    v = tl.load(v_ptrs, mask=inside, other=0.0).to(EPI_DTYPE)
    # adam_step of csrc/update_math.h from here on, g its d
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:
        if DECOUPLED:  # p = p * (1 - lr * weight_decay)
            p = p * tl.load(hyper_ptr + 4).to(EPI_DTYPE)
        else:  # d = d + weight_decay * p
            g = g + tl.load(hyper_ptr + 3).to(EPI_DTYPE) * p
    # torch.lerp's two forms, chosen by the weight as torch does, for the same rounding:
    # m = lerp_low ? m + w * (d - m) : d - (d - m) * (1 - w)
    w = tl.load(hyper_ptr).to(EPI_DTYPE)
    m = tl.where(w < 0.5, m + w * (g - m), g - (g - m) * (1.0 - w))
    v = v * beta2.to(EPI_DTYPE) + (1.0 - beta2).to(EPI_DTYPE) * g * g  # v * beta2 + (1 - beta2) * d * d
    denom = tl.sqrt(v) / tl.load(hyper_ptr + 6).to(EPI_DTYPE) + tl.load(hyper_ptr + 2).to(EPI_DTYPE)
    # p + neg_step_size * m / denom there, with neg_step_size = -(lr / bias_correction1); here
    # m / denom is divided first, a different rounding from the C++ ops' (kept as it was)
    p = p - tl.load(hyper_ptr + 5).to(EPI_DTYPE) * (m / denom)
    tl.store(m_ptrs, m.to(m_ptr.dtype.element_ty), mask=inside)
    tl.store(v_ptrs, v.to(v_ptr.dtype.element_ty), mask=inside)
    tl.store(p_ptrs, p.to(p_ptr.dtype.element_ty), mask=inside)


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
       torch.float64: tl.float64}


def _as_2d(t: torch.Tensor) -> tuple[int, int]:
    """Strides of t seen as [N, K]; a bias [N] is [N, 1]."""
    return (t.stride(0), t.stride(1)) if t.dim() == 2 else (t.stride(0), 0)


def _setup(param: torch.Tensor, err: torch.Tensor, inp: torch.Tensor | None) -> dict:
    """Sizes, strides, dtypes and tiling shared by both launches."""
    rows, n = err.shape
    k = 1 if inp is None else inp.shape[1]
    expect = (n,) if inp is None else (n, k)
    if tuple(param.shape) != expect or (inp is not None and inp.shape[0] != rows):
        raise ValueError(f"update: param {list(param.shape)} does not match err {list(err.shape)} and "
                         f"inp {None if inp is None else list(inp.shape)}")
    dot = torch.promote_types(err.dtype, err.dtype if inp is None else inp.dtype)
    x = err if inp is None else inp
    block_k = 1 if inp is None else max(16, min(64, triton.next_power_of_2(k)))
    return dict(
        args=(err, x, rows, n, k),
        strides=(err.stride(0), err.stride(1), x.stride(0), x.stride(1) if inp is not None else 0),
        meta=dict(HAS_INP=inp is not None, DOT_DTYPE=_TL[dot],
                  ACC_DTYPE=tl.float64 if dot == torch.float64 else tl.float32, COMPENSATE=compensated(dot),
                  EPI_DTYPE=tl.float64 if param.dtype == torch.float64 else tl.float32,
                  BLOCK_N=max(16, min(64, triton.next_power_of_2(n))), BLOCK_K=block_k,
                  BLOCK_B=max(16, min(32, triton.next_power_of_2(rows)))),
    )


def _hyper(param: torch.Tensor, *values: float) -> torch.Tensor:
    """The hyperparameters as the float64 tensor the kernels read (see the module docstring)."""
    return torch.tensor(values, dtype=torch.float64, device=param.device)


def _grid(s: dict) -> tuple[int, int]:
    _, _, _, n, k = s["args"]
    return triton.cdiv(n, s["meta"]["BLOCK_N"]), triton.cdiv(k, s["meta"]["BLOCK_K"])


@triton_op("localprop::sgd_update_triton", mutates_args={"param", "momentum_buffer"})
def sgd_update_(param: torch.Tensor, err: torch.Tensor, inp: torch.Tensor | None,
                momentum_buffer: torch.Tensor | None, lr: float, momentum: float, dampening: float,
                weight_decay: float, nesterov: bool, maximize: bool, first_step: bool) -> None:
    """torch.optim.SGD's step for one parameter with grad = errᵀ inp (or Σ_b err), in place.

    param: [N, K] (inp: [B, K]) or [N] (inp None); err: [B, N]; momentum_buffer like
    param, or None when momentum == 0; first_step: the buffer is set to d_p, not decayed.
    err and inp may be half precision with a float32 param (accumulation is float32).
    """
    if momentum != 0 and momentum_buffer is None:
        raise ValueError("sgd_update_: momentum != 0 needs a momentum_buffer")
    s = _setup(param, err, inp)
    buf = param if momentum_buffer is None else momentum_buffer
    err_, x, rows, n, k = s["args"]
    wrap_triton(_sgd_kernel)[_grid(s)](
        param, buf, err_, x, _hyper(param, lr, momentum, dampening, weight_decay),
        rows, n, k, *_as_2d(param), *_as_2d(buf), *s["strides"],
        MOMENTUM=momentum != 0, FIRST_STEP=first_step, NESTEROV=nesterov,
        WEIGHT_DECAY=weight_decay != 0, MAXIMIZE=maximize, **s["meta"])


@triton_op("localprop::adam_update_triton", mutates_args={"param", "exp_avg", "exp_avg_sq"})
def adam_update_(param: torch.Tensor, err: torch.Tensor, inp: torch.Tensor | None, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, decoupled: bool, maximize: bool, step: int) -> None:
    """torch.optim.Adam's (decoupled: AdamW's) step for one parameter with grad = errᵀ inp
    (or Σ_b err), in place; ``step`` is the count after this update (>= 1).

    param: [N, K] (inp: [B, K]) or [N] (inp None); err: [B, N]; exp_avg, exp_avg_sq like
    param. err and inp may be half precision with a float32 param (accumulation is float32).
    """
    if step < 1:
        raise ValueError(f"adam_update_: step counts this update and must be >= 1, got {step}")
    s = _setup(param, err, inp)
    err_, x, rows, n, k = s["args"]
    wrap_triton(_adam_kernel)[_grid(s)](
        param, exp_avg, exp_avg_sq, err_, x,
        _hyper(param, 1 - beta1, beta2, eps, weight_decay, 1 - lr * weight_decay,
               lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step)),
        rows, n, k, *_as_2d(param), *_as_2d(exp_avg), *_as_2d(exp_avg_sq), *s["strides"],
        WEIGHT_DECAY=weight_decay != 0, DECOUPLED=decoupled, MAXIMIZE=maximize, **s["meta"])


# Explicit fakes, because triton_op's traced body would run the kernels themselves under
# TRITON_INTERPRET (wrap_triton does not intercept interpreted kernels). Both ops only
# mutate their arguments.
@sgd_update_.register_fake
def _(param, err, inp, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov, maximize,
      first_step):
    return None


@adam_update_.register_fake
def _(param, err, inp, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, maximize, step):
    return None
