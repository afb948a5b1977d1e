// CPU head-and-error of a node. Two or three GEMMs (logits, g = dlogits A, and the
// message err W) done by BLAS, and two elementwise passes between them: the
// softmax-CE pass turns the logits into dlogits in place (no probabilities tensor),
// and the slope pass turns g into err = g * act'(z) in place.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../activation.h"
#include "../op_args.h"

namespace localprop {
namespace {

void check_dtype(const char* name, const at::Tensor& t, const at::Tensor& h) {
  TORCH_CHECK(t.scalar_type() == h.scalar_type(), "head_error: ", name, " must have h's dtype ",
              h.scalar_type(), ", got ", t.scalar_type());
}

void check_aux(const HeadErrorArgs& a) {
  const int64_t rows = a.h.size(0), n = a.h.size(1);
  if (a.act == kRelu) {
    check_relu_aux(a);
  } else if (a.act == kGelu) {
    TORCH_CHECK(a.aux.dim() == 2 && a.aux.size(0) == rows && a.aux.size(1) == n,
                "head_error: GELU needs aux = z of shape [", rows, ", ", n, "], got ", a.aux.sizes());
    check_dtype("aux (z)", a.aux, a.h);
  }
}

// The shape rules (op_args.h) with this backend's dtype rules between them.
void check_head_error_args(const HeadErrorArgs& a) {
  check_head_error_h(a);
  TORCH_CHECK(a.h.scalar_type() == at::kFloat || a.h.scalar_type() == at::kDouble,
              "head_error: h must be float32 or float64, got ", a.h.scalar_type());
  check_activation_code("head_error", a.act);
  check_head_error_y_shape(a);
  const at::ScalarType yt = a.y.scalar_type();
  TORCH_CHECK(yt == at::kLong || yt == at::kInt || yt == at::kByte,
              "head_error: y must be int64, int32 or uint8, got ", yt);
  check_head_bias_has_head(a);
  if (a.head_weight.has_value()) {
    check_head_weight_shape(a);
    check_dtype("head_weight", *a.head_weight, a.h);
    if (a.head_bias.has_value()) {
      check_head_bias_shape(a);
      check_dtype("head_bias", *a.head_bias, a.h);
    }
  }
  if (a.weight.has_value()) {
    check_head_error_weight_shape(a);
    check_dtype("weight", *a.weight, a.h);
  }
  check_aux(a);
}

// Labels as int64 whatever their dtype, checked against C once here rather than
// inside the parallel pass, so a bad label is an error before any work is done.
std::vector<int64_t> checked_labels(const at::Tensor& y, int64_t classes) {
  const at::Tensor y64 = y.to(at::kLong).contiguous();
  const int64_t* p = y64.data_ptr<int64_t>();
  std::vector<int64_t> labels(p, p + y64.numel());
  for (int64_t label : labels) {
    TORCH_CHECK(label >= 0 && label < classes, "head_error: labels must lie in [0, ", classes, "), got ", label);
  }
  return labels;
}

// Rows per parallel chunk: ATen's grain of elements, so that small passes (a head
// of 10 classes) run inline instead of paying for a thread barrier.
int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(cols, 1)); }

// One row pass: logits -> dlogits = (softmax - onehot) / B in place, and each row's
// loss logsumexp - logit[y] into row_loss. Everything is computed in double and
// rounded once on the store, so float32 results carry a single rounding; exp is
// evaluated twice per element instead of keeping a probabilities buffer (C is small).
template <typename T>
void softmax_ce_rows(T* x, const int64_t* labels, int64_t rows, int64_t classes, double* row_loss) {
  at::parallel_for(0, rows, grain_rows(classes), [&](int64_t r0, int64_t r1) {
    // each exp once (it dominates this pass: two per element cost 50 us at B = 256, C = 10)
    std::vector<double> e(classes);
    for (int64_t r = r0; r < r1; ++r) {
      T* row = x + r * classes;
      T top_t = row[0];
      for (int64_t j = 1; j < classes; ++j) top_t = std::max(top_t, row[j]);
      const double top = double(top_t);
      double sum = 0;
      for (int64_t j = 0; j < classes; ++j) {
        e[j] = std::exp(double(row[j]) - top);
        sum += e[j];
      }
      row_loss[r] = std::log(sum) + top - double(row[labels[r]]);
      const double scale = 1.0 / (sum * double(rows));
      for (int64_t j = 0; j < classes; ++j) row[j] = T(e[j] * scale);
      row[labels[r]] = T(e[labels[r]] * scale - 1.0 / double(rows));
    }
  });
}

// err *= the ReLU mask in place; mask is the packed uint8 [B, ceil(N/8)] from transform.
// A whole byte at a time, so every shift is a constant and the 8-wide loop unrolls.
template <typename T>
void apply_relu_mask(T* err, const uint8_t* mask, int64_t rows, int64_t n) {
  const int64_t mask_cols = (n + 7) / 8;
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* e = err + r * n;
      const uint8_t* m = mask + r * mask_cols;
      for (int64_t q = 0; q < n / 8; ++q) {
        const uint8_t bits = m[q];
        for (int b = 0; b < 8; ++b) e[8 * q + b] = (bits >> b) & 1 ? e[8 * q + b] : T(0);
      }
      for (int64_t j = n / 8 * 8; j < n; ++j) e[j] = (m[j >> 3] >> (j & 7)) & 1 ? e[j] : T(0);
    }
  });
}

// err = g * act'(z) in place. tanh, sigmoid and GELU use ATen's own vectorised
// backward kernels (from h, h and z as the transform kept them): at B = 256, N = 1024,
// C = 10 float32 on 2 cores, head_error with GELU takes 0.30 ms this way and took
// 3.3 ms with a scalar erf/exp loop.
void apply_slope_(at::Tensor& err, const HeadErrorArgs& a) {
  switch (a.act) {
    case kRelu: {
      const at::Tensor mask = a.aux.contiguous();
      AT_DISPATCH_FLOATING_TYPES(err.scalar_type(), "head_error_cpu_relu", [&] {
        apply_relu_mask<scalar_t>(err.data_ptr<scalar_t>(), mask.data_ptr<uint8_t>(), err.size(0), err.size(1));
      });
      break;
    }
    case kTanh: at::tanh_backward_out(err, err, a.h); break;
    case kSigmoid: at::sigmoid_backward_out(err, err, a.h); break;
    case kGelu: at::gelu_backward_out(err, err, a.aux); break;
    default: break;
  }
}

// Logits into a fresh contiguous tensor that the CE pass may overwrite.
at::Tensor fresh_logits(const HeadErrorArgs& a) {
  if (!a.head_weight.has_value()) return a.h.clone(at::MemoryFormat::Contiguous);
  const at::Tensor at_ = a.head_weight->t();
  return a.head_bias.has_value() ? at::addmm(*a.head_bias, a.h, at_) : at::mm(a.h, at_);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_error_cpu(
    const at::Tensor& h, const at::Tensor& aux, const c10::optional<at::Tensor>& head_weight,
    const c10::optional<at::Tensor>& head_bias, const at::Tensor& y, int64_t act,
    const c10::optional<at::Tensor>& weight) {
  const HeadErrorArgs a{h, aux, head_weight, head_bias, y, act, weight};
  check_head_error_args(a);
  const int64_t rows = h.size(0);
  at::Tensor dlogits = fresh_logits(a);
  const int64_t classes = dlogits.size(1);
  const std::vector<int64_t> labels = checked_labels(y, classes);
  std::vector<double> row_loss(rows);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "head_error_cpu_ce", [&] {
    softmax_ce_rows<scalar_t>(dlogits.data_ptr<scalar_t>(), labels.data(), rows, classes, row_loss.data());
    double total = 0;  // summed in row order so the loss is deterministic
    for (double l : row_loss) total += l;
    loss = at::scalar_tensor(total / double(rows), h.options());
  });
  // Without a head, g is dlogits itself; err still gets its own storage.
  at::Tensor err = head_weight.has_value() ? at::mm(dlogits, *head_weight) : dlogits.clone();
  apply_slope_(err, a);
  at::Tensor message = weight.has_value() ? at::mm(err, *weight) : at::empty({0}, h.options());
  return {loss, dlogits, err, message};
}

}  // namespace

TORCH_LIBRARY_IMPL(localprop, CPU, m) { m.impl("head_error", &head_error_cpu); }

}  // namespace localprop
