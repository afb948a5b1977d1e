// CPU transform: one GEMM (BLAS does the heavy part) followed by a single parallel
// pass that adds the bias, applies the activation in place and, for ReLU, packs the
// 1-bit mask the update needs, so z is written once by the GEMM and once by the pass
// (addmm would first write the broadcast bias into z for the GEMM to read).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../activation.h"
#include "../op_args.h"

namespace localprop {
namespace {

void check_transform_args(const at::Tensor& u, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  check_transform_shapes(u, w);
  TORCH_CHECK(u.scalar_type() == w.scalar_type(), "transform: u is ", u.scalar_type(), ", weight is ", w.scalar_type());
  if (b.has_value()) {
    check_transform_bias_shape(w, *b);
    TORCH_CHECK(b->scalar_type() == w.scalar_type(), "transform: bias is ", b->scalar_type(), ", weight is ",
                w.scalar_type());
  }
}

// ReLU in two passes over a row (it is in L1 by then): a branch-free max the compiler
// vectorises, then the bits packed a byte at a time from the result (h > 0 exactly where
// z > 0; a NaN stays NaN, as torch.relu, with its bit clear). The element-at-a-time
// version with the packing inside took 0.18 ms beyond the GEMM at [256, 256] x [256, 256]
// on 2 CPU threads; this one 0.03 ms (0.13 ms at width 1024).
template <typename T>
void relu_row(T* row, const T* bias, uint8_t* mask, int64_t n) {
  if (bias != nullptr) {
    for (int64_t j = 0; j < n; ++j) row[j] = row[j] + bias[j] <= T(0) ? T(0) : row[j] + bias[j];
  } else {
    for (int64_t j = 0; j < n; ++j) row[j] = row[j] <= T(0) ? T(0) : row[j];
  }
  const int64_t full = n / 8;
  for (int64_t b = 0; b < full; ++b) {
    const T* v = row + 8 * b;
    mask[b] = static_cast<uint8_t>((v[0] > T(0)) | (v[1] > T(0)) << 1 | (v[2] > T(0)) << 2 | (v[3] > T(0)) << 3 |
                                   (v[4] > T(0)) << 4 | (v[5] > T(0)) << 5 | (v[6] > T(0)) << 6 | (v[7] > T(0)) << 7);
  }
  if (full * 8 < n) {
    uint8_t bits = 0;
    for (int64_t j = full * 8; j < n; ++j) bits |= static_cast<uint8_t>(row[j] > T(0)) << (j - full * 8);
    mask[full] = bits;
  }
}

// z [rows, n] = σ(z + bias) in place (bias [n] or null); for GELU, pre (also [rows, n])
// receives z + bias, which the error needs. The sum's NaN/inf behave as addmm's.
template <typename T>
void activate_rows(T* z, const T* bias, uint8_t* mask, T* pre, int64_t rows, int64_t n, int64_t act) {
  const int64_t mask_cols = (n + 7) / 8;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* row = z + r * n;
      if (act == kRelu) {
        relu_row(row, bias, mask + r * mask_cols, n);
        continue;
      }
      if (bias != nullptr) {
        for (int64_t j = 0; j < n; ++j) row[j] += bias[j];
      }
      if (pre != nullptr) std::copy(row, row + n, pre + r * n);
      for (int64_t j = 0; j < n; ++j) row[j] = activate(row[j], act);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> transform_cpu(const at::Tensor& u, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& bias, int64_t act) {
  check_transform_args(u, weight, bias);
  const int64_t rows = u.size(0), n = weight.size(0);
  at::Tensor z = at::mm(u, weight.t());
  at::Tensor aux;
  if (act == kRelu) {
    aux = at::empty({rows, (n + 7) / 8}, u.options().dtype(at::kByte));
  } else if (act == kGelu) {
    aux = at::empty({rows, n}, u.options());
  } else {
    aux = at::empty({0}, u.options());
  }
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "transform_cpu", [&] {
    activate_rows<scalar_t>(z.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                            act == kRelu ? aux.data_ptr<uint8_t>() : nullptr,
                            act == kGelu ? aux.data_ptr<scalar_t>() : nullptr, rows, n, act);
  });
  return {z, aux};
}

}  // namespace

TORCH_LIBRARY_IMPL(localprop, CPU, m) { m.impl("transform", &transform_cpu); }

}  // namespace localprop
