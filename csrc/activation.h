// Activation codes shared by every backend. The Python side defines the same codes in
// localprop/ops/activation.py (NONE..GELU, used by the Triton and fake kernels);
// tests/ops/test_constants.py fails when the two lists differ.
#pragma once
#include <cmath>
#include <cstdint>

// The same functions serve the CUDA kernels: under nvcc they are host and device code.
#include "host_device.h"

namespace localprop {

enum Activation : int64_t { kNone = 0, kRelu = 1, kTanh = 2, kSigmoid = 3, kGelu = 4 };

// sigma(z). GELU is the exact erf form, as torch.nn.functional.gelu's default.
template <typename T>
LOCALPROP_HOST_DEVICE inline T activate(T z, int64_t act) {
  switch (act) {
    case kRelu: return z <= T(0) ? T(0) : z;  // NaN stays NaN, as torch.relu
    case kTanh: return std::tanh(z);
    case kSigmoid: return T(1) / (T(1) + std::exp(-z));
    case kGelu: return T(0.5) * z * (T(1) + std::erf(z * T(M_SQRT1_2)));
    default: return z;
  }
}

// sigma'(z) written in terms of what the transform keeps: h for tanh and sigmoid
// (their derivatives are functions of the output), z for GELU.
template <typename T>
LOCALPROP_HOST_DEVICE inline T activation_grad(T h_or_z, int64_t act) {
  switch (act) {
    case kTanh: return T(1) - h_or_z * h_or_z;
    case kSigmoid: return h_or_z * (T(1) - h_or_z);
    case kGelu: {
      const T z = h_or_z;
      const T cdf = T(0.5) * (T(1) + std::erf(z * T(M_SQRT1_2)));
      const T pdf = std::exp(T(-0.5) * z * z) * T(0.3989422804014327);  // 1/sqrt(2*pi)
      return cdf + z * pdf;
    }
    default: return T(1);
  }
}

}  // namespace localprop
