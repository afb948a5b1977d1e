// Argument bundles and checks that the CPU and CUDA implementations of an op share, so
// both reject the same inputs with the same messages.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

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

// An optimizer state tensor of an update op must be laid out as its parameter.
inline void check_state_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& param) {
  TORCH_CHECK(t.sizes() == param.sizes(), op, ": ", name, " must have param's shape ", param.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == param.scalar_type(), op, ": ", name, " must have param's dtype ",
              param.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

}  // namespace localprop
