// Argument bundles and checks that the CPU and CUDA implementations of an op share, so
// both reject the same inputs with the same messages.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "activation.h"

namespace localprop {

// The arguments of localprop::head_error (schema in localprop.cpp), passed around whole.
struct HeadErrorArgs {
  const at::Tensor& h;
  const at::Tensor& aux;
  const c10::optional<at::Tensor>& head_weight;
  const c10::optional<at::Tensor>& head_bias;
  const at::Tensor& y;
  int64_t act;
  const c10::optional<at::Tensor>& weight;
};

// An activation code of csrc/activation.h.
inline void check_activation_code(const char* op, int64_t act) {
  TORCH_CHECK(act >= kNone && act <= kGelu, op, ": unknown activation code ", act, ", expected ", int64_t(kNone),
              "..", int64_t(kGelu));
}

// ---- transform --------------------------------------------------------------------------

inline void check_transform_shapes(const at::Tensor& u, const at::Tensor& w) {
  TORCH_CHECK(u.dim() == 2, "transform: u must be [B, K], got ", u.sizes());
  TORCH_CHECK(w.dim() == 2, "transform: weight must be [N, K], got ", w.sizes());
  TORCH_CHECK(u.size(1) == w.size(1), "transform: u has ", u.size(1), " features, weight expects ", w.size(1));
}

inline void check_transform_bias_shape(const at::Tensor& w, const at::Tensor& b) {
  TORCH_CHECK(b.dim() == 1 && b.size(0) == w.size(0), "transform: bias must be [", w.size(0), "], got ", b.sizes());
}

// ---- head_error -------------------------------------------------------------------------
// The shape rules, the same on every backend; dtype and device rules are each backend's.

inline void check_head_error_h(const HeadErrorArgs& a) {
  TORCH_CHECK(a.h.dim() == 2 && a.h.size(0) > 0, "head_error: h must be [B, N] with B > 0, got ", a.h.sizes());
}

inline void check_head_error_y_shape(const HeadErrorArgs& a) {
  TORCH_CHECK(a.y.dim() == 1 && a.y.size(0) == a.h.size(0), "head_error: y must be [", a.h.size(0), "], got ",
              a.y.sizes());
}

inline void check_head_bias_has_head(const HeadErrorArgs& a) {
  TORCH_CHECK(a.head_weight.has_value() || !a.head_bias.has_value(), "head_error: head_bias given without head_weight");
}

inline void check_head_weight_shape(const HeadErrorArgs& a) {
  const at::Tensor& hw = *a.head_weight;
  TORCH_CHECK(hw.dim() == 2 && hw.size(1) == a.h.size(1), "head_error: head_weight must be [C, ", a.h.size(1),
              "], got ", hw.sizes());
}

inline void check_head_bias_shape(const HeadErrorArgs& a) {
  TORCH_CHECK(a.head_bias->dim() == 1 && a.head_bias->size(0) == a.head_weight->size(0),
              "head_error: head_bias must be [", a.head_weight->size(0), "], got ", a.head_bias->sizes());
}

inline void check_head_error_weight_shape(const HeadErrorArgs& a) {
  TORCH_CHECK(a.weight->dim() == 2 && a.weight->size(0) == a.h.size(1), "head_error: weight must be [",
              a.h.size(1), ", K], got ", a.weight->sizes());
}

// ReLU's aux: the packed bit mask that transform keeps.
inline void check_relu_aux(const HeadErrorArgs& a) {
  const int64_t rows = a.h.size(0), n = a.h.size(1);
  TORCH_CHECK(a.aux.scalar_type() == at::kByte && a.aux.dim() == 2 && a.aux.size(0) == rows &&
                  a.aux.size(1) == (n + 7) / 8,
              "head_error: ReLU needs aux = the uint8 [", rows, ", ", (n + 7) / 8, "] bit mask from transform, got ",
              a.aux.scalar_type(), " ", a.aux.sizes());
}

// ---- update ops (sgd_update_, adam_update_) -------------------------------------------
// The layout rules of an update's gradient factors, the same on every backend: param is
// contiguous and [N, K] with inp [B, K] (a weight) or [N] with inp None (a bias), and err
// is [B, N]. Each backend puts its own device and dtype rules around these pieces.

// `name` must have the dtype of `like`, the tensor named `like_name`.
inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                             const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have ", like_name, "'s dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
}

inline void check_param_contiguous(const char* op, const at::Tensor& param) {
  TORCH_CHECK(param.is_contiguous(), op, ": param must be contiguous");
}

inline void check_err_shape(const char* op, const at::Tensor& param, const at::Tensor& err) {
  TORCH_CHECK(err.dim() == 2 && err.size(1) == param.size(0), op, ": err must be [B, ", param.size(0), "], got ",
              err.sizes());
}

// inp is None: param is a bias.
inline void check_bias_param(const char* op, const at::Tensor& param) {
  TORCH_CHECK(param.dim() == 1, op, ": a bias param must be [N] (inp is None), got ", param.sizes());
}

// inp is given: param is a weight [N, K] and inp is [B, K], B that of err.
inline void check_weight_factors(const char* op, const at::Tensor& param, const at::Tensor& err,
                                 const at::Tensor& inp) {
  TORCH_CHECK(param.dim() == 2, op, ": a weight param must be [N, K] (inp given), got ", param.sizes());
  TORCH_CHECK(inp.dim() == 2 && inp.size(0) == err.size(0) && inp.size(1) == param.size(1), op, ": inp must be [",
              err.size(0), ", ", param.size(1), "], got ", inp.sizes());
}

// An optimizer state tensor of an update op must be laid out as its parameter.
inline void check_state_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& param) {
  TORCH_CHECK(t.sizes() == param.sizes(), op, ": ", name, " must have param's shape ", param.sizes(), ", got ",
              t.sizes());
  check_same_dtype(op, name, t, "param", param);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// SGD with momentum != 0 keeps a momentum buffer.
inline void check_momentum_buffer_given(double momentum, const c10::optional<at::Tensor>& momentum_buffer) {
  TORCH_CHECK(momentum == 0 || momentum_buffer.has_value(), "sgd_update_: momentum=", momentum,
              " needs a momentum_buffer, got None");
}

inline void check_adam_step(int64_t step) {
  TORCH_CHECK(step >= 1, "adam_update_: step is the count after this update and must be >= 1, got ", step);
}

}  // namespace localprop
