// CPU transform: one GEMM (addmm, so BLAS does the heavy part) followed by a
// single parallel pass that applies the activation in place and, for ReLU,
// packs the 1-bit mask the update needs, so z is never written twice.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../activation.h"

namespace localprop {
namespace {

void check_transform_args(const at::Tensor& u, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  TORCH_CHECK(u.dim() == 2, "transform: u must be [B, K], got ", u.sizes());
  TORCH_CHECK(w.dim() == 2, "transform: weight must be [N, K], got ", w.sizes());
  TORCH_CHECK(u.size(1) == w.size(1), "transform: u has ", u.size(1), " features, weight expects ", w.size(1));
  TORCH_CHECK(u.scalar_type() == w.scalar_type(), "transform: u is ", u.scalar_type(), ", weight is ", w.scalar_type());
  if (b.has_value()) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), "transform: bias must be [", w.size(0), "], got ", b->sizes());
  }
}

template <typename T>
void activate_rows(T* z, uint8_t* mask, int64_t rows, int64_t n, int64_t act) {
  const int64_t mask_cols = (n + 7) / 8;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* row = z + r * n;
      if (act == kRelu) {
        uint8_t* mrow = mask + r * mask_cols;
        for (int64_t j0 = 0; j0 < n; j0 += 8) {
          uint8_t bits = 0;
          const int64_t j1 = std::min(j0 + 8, n);
          for (int64_t j = j0; j < j1; ++j) {
            const bool on = row[j] > T(0);
            bits |= static_cast<uint8_t>(on) << (j - j0);
            row[j] = row[j] <= T(0) ? T(0) : row[j];  // NaN stays NaN, as torch.relu
          }
          mrow[j0 / 8] = bits;
        }
      } else {
        for (int64_t j = 0; j < n; ++j) row[j] = activate(row[j], act);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> transform_cpu(const at::Tensor& u, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& bias, int64_t act) {
  check_transform_args(u, weight, bias);
  const int64_t rows = u.size(0), n = weight.size(0);
  at::Tensor z = bias.has_value() ? at::addmm(*bias, u, weight.t()) : at::mm(u, weight.t());
  at::Tensor aux;
  if (act == kRelu) {
    aux = at::empty({rows, (n + 7) / 8}, u.options().dtype(at::kByte));
  } else if (act == kGelu) {
    aux = z.clone();
  } else {
    aux = at::empty({0}, u.options());
  }
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "transform_cpu", [&] {
    activate_rows<scalar_t>(z.data_ptr<scalar_t>(), act == kRelu ? aux.data_ptr<uint8_t>() : nullptr, rows, n, act);
  });
  return {z, aux};
}

}  // namespace

TORCH_LIBRARY_IMPL(localprop, CPU, m) { m.impl("transform", &transform_cpu); }

}  // namespace localprop
