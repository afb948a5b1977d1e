// CUDA transform: one cuBLAS GEMM (at::addmm) followed by one epilogue kernel that
// applies the activation in place and writes what the error step needs in the same
// pass: the packed ReLU bit mask, or z for GELU. z is read once and written once.
#include "common.cuh"

#include "../op_args.h"

namespace localprop {
namespace cuda {
namespace {

// ReLU in place on z [rows, n] and its mask [rows, ceil(n/8)]: one thread per mask
// byte, so each byte is written whole by one thread (no atomics); a warp still reads
// 256 consecutive elements of a row.
template <typename T>
__global__ void relu_mask_kernel(T* __restrict__ z, uint8_t* __restrict__ mask, int64_t rows, int64_t n) {
  const int64_t mask_cols = (n + 7) / 8;
  const int64_t total = rows * mask_cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / mask_cols, c0 = (i % mask_cols) * 8;
    T* row = z + r * n;
    const int64_t c1 = min(c0 + 8, n);
    uint8_t bits = 0;
    for (int64_t c = c0; c < c1; ++c) {
      const bool on = row[c] > T(0);
      bits |= static_cast<uint8_t>(on) << (c - c0);
      if (row[c] <= T(0)) row[c] = T(0);  // NaN stays NaN, as torch.relu
    }
    mask[i] = bits;
  }
}

// h = act(z) in place on `count` elements, in opmath precision; `keep_z`, when not
// null, receives z first (GELU's aux).
template <typename T>
__global__ void activate_kernel(T* __restrict__ z, T* __restrict__ keep_z, int64_t count, int64_t act) {
  using acc_t = at::opmath_type<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    const T v = z[i];
    if (keep_z != nullptr) keep_z[i] = v;
    z[i] = static_cast<T>(activate(static_cast<acc_t>(v), act));
  }
}

void check_transform_args(const at::Tensor& u, const at::Tensor& w, const c10::optional<at::Tensor>& b, int64_t act) {
  check_cuda("transform", "u", u, u);
  check_cuda("transform", "weight", w, u);
  check_float("transform", "u", u);
  check_transform_shapes(u, w);
  check_activation_code("transform", act);
  if (b.has_value()) {
    check_cuda("transform", "bias", *b, u);
    check_transform_bias_shape(w, *b);
  }
}

// z = u W^T + b in u's dtype (cuBLAS accumulates bf16/fp16 in fp32).
at::Tensor gemm_z(const at::Tensor& u, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const at::Tensor wt = in_compute_dtype("transform", "weight", weight, u.scalar_type()).t();
  if (!bias.has_value()) return at::mm(u, wt);
  return at::addmm(in_compute_dtype("transform", "bias", *bias, u.scalar_type()), u, wt);
}

std::tuple<at::Tensor, at::Tensor> transform_cuda(const at::Tensor& u, const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& bias, int64_t act) {
  check_transform_args(u, weight, bias, act);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor z = gemm_z(u, weight, bias);
  TORCH_INTERNAL_ASSERT(z.is_contiguous(), "transform: the GEMM returned a non-contiguous z");
  const int64_t rows = z.size(0), n = z.size(1);
  at::Tensor aux = act == kRelu   ? at::empty({rows, (n + 7) / 8}, z.options().dtype(at::kByte))
                   : act == kGelu ? at::empty_like(z)
                                  : at::empty({0}, z.options());
  if (z.numel() == 0 || act == kNone) return {z, aux};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "transform_cuda", [&] {
    if (act == kRelu) {
      relu_mask_kernel<scalar_t><<<blocks_for(aux.numel()), kThreads, 0, stream()>>>(
          z.data_ptr<scalar_t>(), aux.data_ptr<uint8_t>(), rows, n);
    } else {
      scalar_t* keep = act == kGelu ? aux.data_ptr<scalar_t>() : nullptr;
      activate_kernel<scalar_t><<<blocks_for(z.numel()), kThreads, 0, stream()>>>(
          z.data_ptr<scalar_t>(), keep, z.numel(), act);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {z, aux};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(localprop, CUDA, m) { m.impl("transform", &cuda::transform_cuda); }

}  // namespace localprop
