// The element-wise math of the update ops (torch.optim's SGD and Adam/AdamW), one element
// at a time, shared by the CPU loops (cpu/update.cpp) and the CUDA kernels
// (cuda/update.cu). kernels/update.py writes the same formulas in Triton, which cannot
// include this header; keep the three in the same order of operations.
//
// The step functions take the gradient d already negated for maximize (the CPU multiplies
// by sign = -1, which vectorises; CUDA negates) and the scalars already in the math type
// T. Their flags are the same for every element of a call: the CPU passes template
// constants (one branch-free, vectorised loop per combination), CUDA its kernel arguments.
//
// Rounding: nvcc contracts a multiply feeding an add into one FMA (and gcc does too when
// FMA is enabled), so the way each formula is written is part of its result on a GPU;
// change none of them without checking that every backend's results stay the same.
#pragma once
#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace localprop {

// ---- SGD --------------------------------------------------------------------------

template <typename T>
struct SgdScalars {
  T lr, momentum, one_minus_dampening, weight_decay;
};

// torch.optim.SGD's order of operations (_single_tensor_sgd) on element i: returns the
// new parameter from p, and with momentum sets buf[i] (read first unless first_step,
// when the buffer starts as d_p). buf may hold a narrower type B than T: it is read and
// written through T. `p - lr * d` stays a subtraction: nvcc leaves it a multiply and a
// subtract, while p + (-lr) * d would become one FMA and change the CUDA results.
template <typename T, typename B>
LOCALPROP_HOST_DEVICE inline T sgd_step(T p, T d, B* buf, int64_t i, const SgdScalars<T>& s, bool decay,
                                        bool momentum, bool first_step, bool nesterov) {
  if (decay) d = d + s.weight_decay * p;
  if (momentum) {
    const T b = first_step ? d : static_cast<T>(buf[i]) * s.momentum + s.one_minus_dampening * d;
    buf[i] = static_cast<B>(b);
    d = nesterov ? d + s.momentum * b : b;
  }
  return p - s.lr * d;
}

// ---- Adam / AdamW -----------------------------------------------------------------

template <typename T>
struct AdamScalars {
  T decay_keep, weight_decay, lerp_weight, one_minus_lerp_weight, beta2, one_minus_beta2, bias_correction2_sqrt, eps,
      neg_step_size;
};

// The scalars of step `step` (the count after this update), formed in double as
// torch.optim forms them in Python, then cast to T as ATen casts them.
template <typename T>
inline AdamScalars<T> adam_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                                   int64_t step) {
  const double bias_correction1 = 1 - std::pow(beta1, double(step));
  const double bias_correction2 = 1 - std::pow(beta2, double(step));
  const T lerp_weight = T(1 - beta1);
  return {/*decay_keep=*/T(1 - lr * weight_decay),
          /*weight_decay=*/T(weight_decay),
          lerp_weight,
          /*one_minus_lerp_weight=*/T(1) - lerp_weight,
          T(beta2),
          /*one_minus_beta2=*/T(1 - beta2),
          /*bias_correction2_sqrt=*/T(std::pow(bias_correction2, 0.5)),
          T(eps),
          /*neg_step_size=*/T(-(lr / bias_correction1))};
}

// torch.optim.Adam's order of operations (_single_tensor_adam, no amsgrad) on one
// element: p, m (exp_avg) and v (exp_avg_sq) are updated in place. Weight decay, when
// `decay`, is decoupled (AdamW's) or L2 on the gradient (Adam's). lerp_low: exp_avg.lerp_(d,
// w) as ATen computes it, whose formula switches at w < 0.5.
template <typename T>
LOCALPROP_HOST_DEVICE inline void adam_step(T& p, T& m, T& v, T d, const AdamScalars<T>& s, bool decay,
                                            bool decoupled, bool lerp_low) {
  if (decay) {
    if (decoupled) {
      p = p * s.decay_keep;
    } else {
      d = d + s.weight_decay * p;
    }
  }
  m = lerp_low ? m + s.lerp_weight * (d - m) : d - (d - m) * s.one_minus_lerp_weight;
  v = v * s.beta2 + s.one_minus_beta2 * d * d;
  const T denom = std::sqrt(v) / s.bias_correction2_sqrt + s.eps;
  p = p + s.neg_step_size * m / denom;
}

}  // namespace localprop
