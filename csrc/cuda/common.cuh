// Shared pieces of the CUDA ops: input checks, launch sizes, block reductions.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h): the GEMMs go through
// ATen's dispatcher (at::addmm, at::mm), so these files never need cuBLAS headers,
// and they compile against any torch's headers plus a bare CUDA toolkit.
#pragma once

// Per-operator ATen headers instead of ATen/ATen.h: a quarter less to parse per file.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../activation.h"

namespace localprop {
namespace cuda {

constexpr int kThreads = 256;
// Grid-stride loops cover any size; this many blocks of kThreads already fill the
// largest GPUs several times over (an H100 holds 132 SMs x 8 such blocks).
constexpr int64_t kMaxBlocks = 8192;

inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The activation dtypes the kernels take: float32, float64, and bf16/fp16 with fp32 math.
inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", expected ", like.device());
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

// Parameters either share the activations' dtype `act` or are fp32 master copies of
// bf16/fp16 activations.
inline void check_param_dtype(const char* op, const char* name, at::ScalarType p, at::ScalarType act) {
  const bool master = p == at::kFloat && (act == at::kBFloat16 || act == at::kHalf);
  TORCH_CHECK(p == act || master, op, ": ", name, " must be ", act,
              " (or a float32 master copy for bfloat16/float16 activations), got ", p);
}

// A parameter as the GEMMs use it: in the activations' dtype `act` (master copies are
// cast here, as autocast would).
inline at::Tensor in_compute_dtype(const char* op, const char* name, const at::Tensor& p, at::ScalarType act) {
  check_param_dtype(op, name, p.scalar_type(), act);
  return p.to(act);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum (or max) over the block, returned to every thread. `scratch` is __shared__ T[32];
// it may be reused by the next call because of the trailing barrier.
template <typename T, bool kMax>
__device__ T block_reduce(T v, T* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? scratch[lane] : (kMax ? scratch[0] : T(0));
    w = kMax ? warp_max(w) : warp_sum(w);
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  const T result = scratch[0];
  __syncthreads();
  return result;
}

}  // namespace cuda
}  // namespace localprop
