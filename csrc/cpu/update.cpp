// CPU local updates with torch.optim's exact formulas (SGD; Adam and AdamW), applied
// in place with the gradient given by its factors. A weight's gradient err^T inp is
// formed one row tile at a time into a small reusable buffer (BLAS, multithreaded)
// and consumed at once by a parallel elementwise optimizer pass while the tile is
// still in cache, so the whole [N, K] gradient is never materialised.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

namespace localprop {
namespace {

// Bytes of gradient per tile. Measured on a 2-core AVX-512 Xeon, float32, B = 256,
// SGD with momentum on a 1024 x 1024 weight: 128 KiB tiles are as fast as any
// larger size, and smaller tiles lose to GEMM call overhead.
constexpr int64_t kTileBytes = 128 * 1024;
constexpr int64_t kMinTileRows = 8;

// The SGD hyperparameters, already cast to the parameter's dtype as torch.optim's
// kernels cast Python scalars.
template <typename T>
struct Sgd {
  T lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step, has_momentum;

  // One element, in torch.optim.SGD's order of operations (_single_tensor_sgd).
  inline void apply(T& p, T* buf, T g) const {
    T d = maximize ? -g : g;
    if (weight_decay != T(0)) d = d + weight_decay * p;
    if (has_momentum) {
      const T b = first_step ? d : *buf * momentum + (T(1) - dampening) * d;
      *buf = b;
      d = nesterov ? d + momentum * b : b;
    }
    p = p + (-lr) * d;
  }
};

// The Adam / AdamW hyperparameters with the bias corrections of this step folded in.
template <typename T>
struct Adam {
  T lr_wd_keep, one_minus_beta1, beta2, one_minus_beta2, weight_decay, bias_correction2_sqrt, eps, neg_step_size;
  bool decoupled, maximize;

  // One element, in torch.optim.Adam's order of operations (_single_tensor_adam).
  inline void apply(T& p, T& m, T& v, T g) const {
    T d = maximize ? -g : g;
    if (weight_decay != T(0)) {
      if (decoupled) {
        p = p * lr_wd_keep;
      } else {
        d = d + weight_decay * p;
      }
    }
    // lerp as ATen computes it, which switches formula at weight 0.5
    m = one_minus_beta1 < T(0.5) ? m + one_minus_beta1 * (d - m) : d - (d - m) * (T(1) - one_minus_beta1);
    v = v * beta2 + one_minus_beta2 * d * d;
    const T denom = std::sqrt(v) / bias_correction2_sqrt + eps;
    p = p + neg_step_size * m / denom;
  }
};

void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& param) {
  TORCH_CHECK(t.sizes() == param.sizes(), op, ": ", name, " must have param's shape ", param.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == param.scalar_type(), op, ": ", name, " must have param's dtype ",
              param.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// param is [N, K] with inp [B, K], or [N] with inp None; err is [B, N] in both cases.
void check_factors(const char* op, const at::Tensor& param, const at::Tensor& err,
                   const c10::optional<at::Tensor>& inp) {
  TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kDouble, op,
              ": param must be float32 or float64, got ", param.scalar_type());
  TORCH_CHECK(param.is_contiguous(), op, ": param must be contiguous");
  TORCH_CHECK(err.dim() == 2 && err.size(1) == param.size(0), op, ": err must be [B, ", param.size(0), "], got ",
              err.sizes());
  TORCH_CHECK(err.scalar_type() == param.scalar_type(), op, ": err must have param's dtype ", param.scalar_type(),
              ", got ", err.scalar_type());
  if (!inp.has_value()) {
    TORCH_CHECK(param.dim() == 1, op, ": a bias param must be [N] (inp is None), got ", param.sizes());
    return;
  }
  TORCH_CHECK(param.dim() == 2, op, ": a weight param must be [N, K] (inp given), got ", param.sizes());
  TORCH_CHECK(inp->dim() == 2 && inp->size(0) == err.size(0) && inp->size(1) == param.size(1), op,
              ": inp must be [", err.size(0), ", ", param.size(1), "], got ", inp->sizes());
  TORCH_CHECK(inp->scalar_type() == param.scalar_type(), op, ": inp must have param's dtype ", param.scalar_type(),
              ", got ", inp->scalar_type());
}

// Calls body(grad, offset, count) for consecutive pieces of the gradient, where grad
// points at `count` contiguous elements that belong at flat `offset` of param.
template <typename T, typename Body>
void for_each_grad_tile(const at::Tensor& param, const at::Tensor& err, const c10::optional<at::Tensor>& inp,
                        const Body& body) {
  if (!inp.has_value()) {  // a bias: its gradient is only [N]
    const at::Tensor g = err.sum(0);
    body(g.data_ptr<T>(), int64_t(0), g.numel());
    return;
  }
  const int64_t n = param.size(0), k = param.size(1);
  const int64_t tile_rows = std::min(n, std::max(kMinTileRows, kTileBytes / int64_t(sizeof(T) * k)));
  at::Tensor tile = at::empty({tile_rows, k}, param.options());
  for (int64_t r0 = 0; r0 < n; r0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, n - r0);
    at::Tensor out = tile.narrow(0, 0, rows);
    at::mm_out(out, err.narrow(1, r0, rows).t(), *inp);
    body(out.data_ptr<T>(), r0 * k, rows * k);
  }
}

template <typename T>
void sgd_kernel(const at::Tensor& param, const at::Tensor& err, const c10::optional<at::Tensor>& inp,
                T* buf, const Sgd<T>& opt) {
  T* p = param.data_ptr<T>();
  for_each_grad_tile<T>(param, err, inp, [&](const T* g, int64_t offset, int64_t count) {
    at::parallel_for(0, count, at::internal::GRAIN_SIZE, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) opt.apply(p[offset + i], buf ? buf + offset + i : nullptr, g[i]);
    });
  });
}

template <typename T>
void adam_kernel(const at::Tensor& param, const at::Tensor& err, const c10::optional<at::Tensor>& inp,
                 T* m, T* v, const Adam<T>& opt) {
  T* p = param.data_ptr<T>();
  for_each_grad_tile<T>(param, err, inp, [&](const T* g, int64_t offset, int64_t count) {
    at::parallel_for(0, count, at::internal::GRAIN_SIZE, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) opt.apply(p[offset + i], m[offset + i], v[offset + i], g[i]);
    });
  });
}

void sgd_update_cpu(const at::Tensor& param, const at::Tensor& err, const c10::optional<at::Tensor>& inp,
                    const c10::optional<at::Tensor>& momentum_buffer, double lr, double momentum,
                    double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step) {
  check_factors("sgd_update_", param, err, inp);
  const bool has_momentum = momentum != 0;
  TORCH_CHECK(!has_momentum || momentum_buffer.has_value(), "sgd_update_: momentum=", momentum,
              " needs a momentum_buffer");
  if (has_momentum) check_same("sgd_update_", "momentum_buffer", *momentum_buffer, param);
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "sgd_update_cpu", [&] {
    using T = scalar_t;
    const Sgd<T> opt{T(lr), T(momentum), T(dampening), T(weight_decay), nesterov, maximize, first_step, has_momentum};
    sgd_kernel<T>(param, err, inp, has_momentum ? momentum_buffer->data_ptr<T>() : nullptr, opt);
  });
}

void adam_update_cpu(const at::Tensor& param, const at::Tensor& err, const c10::optional<at::Tensor>& inp,
                     const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2,
                     double eps, double weight_decay, bool decoupled, bool maximize, int64_t step) {
  check_factors("adam_update_", param, err, inp);
  check_same("adam_update_", "exp_avg", exp_avg, param);
  check_same("adam_update_", "exp_avg_sq", exp_avg_sq, param);
  TORCH_CHECK(step >= 1, "adam_update_: step is the count after this update and must be >= 1, got ", step);
  // Scalars formed in double exactly as torch.optim forms them in Python.
  const double bias_correction1 = 1 - std::pow(beta1, double(step));
  const double bias_correction2 = 1 - std::pow(beta2, double(step));
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "adam_update_cpu", [&] {
    using T = scalar_t;
    const Adam<T> opt{T(1 - lr * weight_decay), T(1 - beta1), T(beta2), T(1 - beta2), T(weight_decay),
                      T(std::pow(bias_correction2, 0.5)), T(eps), T(-(lr / bias_correction1)), decoupled, maximize};
    adam_kernel<T>(param, err, inp, exp_avg.data_ptr<T>(), exp_avg_sq.data_ptr<T>(), opt);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(localprop, CPU, m) {
  m.impl("sgd_update_", &sgd_update_cpu);
  m.impl("adam_update_", &adam_update_cpu);
}

}  // namespace localprop
