// CUDA local updates with torch.optim's formulas (SGD; Adam and AdamW), applied in
// place with the gradient given by its factors. A weight's gradient err^T inp is
// formed one row tile at a time by cuBLAS into a workspace of bounded size (fp32 for
// bf16/fp16 factors), and each tile is consumed at once by an elementwise optimizer
// kernel on the same stream, so the whole [N, K] gradient is never materialised.
#include "common.cuh"

#include <cmath>

#include "../op_args.h"
#include "../update_math.h"

namespace localprop {
namespace cuda {
namespace {

// Gradient elements per tile (16 MiB in fp32). A tile of >= 512 rows of an 8192-wide
// weight is still a large GEMM, while the workspace stays small beside the weights
// and optimizer state of a wide layer.
constexpr int64_t kTileElems = int64_t(1) << 22;

// SGD hyperparameters in the optimizer's math type.
template <typename A>
struct Sgd {
  A lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step, has_momentum;
};

// Adam / AdamW hyperparameters with this step's bias corrections folded in.
template <typename A>
struct Adam {
  AdamScalars<A> s;
  bool decoupled, maximize;
};

// torch.optim.SGD (update_math.h) on `count` elements of param (and buf) with the
// matching gradient tile.
template <typename P>
__global__ void sgd_kernel(P* __restrict__ param, P* __restrict__ buf, const at::opmath_type<P>* __restrict__ grad,
                           int64_t count, Sgd<at::opmath_type<P>> o) {
  using A = at::opmath_type<P>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    // 1 - dampening in A, as this kernel has always formed it (the CPU op forms it in
    // double); kept so that the CUDA results do not change.
    const SgdScalars<A> s{o.lr, o.momentum, A(1) - o.dampening, o.weight_decay};
    const A p = static_cast<A>(param[i]);
    param[i] = static_cast<P>(sgd_step(p, o.maximize ? -grad[i] : grad[i], buf, i, s, o.weight_decay != A(0),
                                       o.has_momentum, o.first_step, o.nesterov));
  }
}

// torch.optim.Adam (update_math.h, no amsgrad; decoupled weight decay is AdamW's) on
// `count` elements of param and its state with the matching gradient tile.
template <typename P>
__global__ void adam_kernel(P* __restrict__ param, P* __restrict__ exp_avg, P* __restrict__ exp_avg_sq,
                            const at::opmath_type<P>* __restrict__ grad, int64_t count, Adam<at::opmath_type<P>> o) {
  using A = at::opmath_type<P>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    A p = static_cast<A>(param[i]), m = static_cast<A>(exp_avg[i]), v = static_cast<A>(exp_avg_sq[i]);
    // 1 - w formed here, as this kernel always has (the same value as the host's)
    AdamScalars<A> s = o.s;
    s.one_minus_lerp_weight = A(1) - s.lerp_weight;
    adam_step(p, m, v, o.maximize ? -grad[i] : grad[i], s, s.weight_decay != A(0), o.decoupled,
              s.lerp_weight < A(0.5));
    exp_avg[i] = static_cast<P>(m);
    exp_avg_sq[i] = static_cast<P>(v);
    param[i] = static_cast<P>(p);
  }
}

void check_state(const char* op, const char* name, const at::Tensor& t, const at::Tensor& param) {
  check_cuda(op, name, t, param);
  check_state_like(op, name, t, param);
}

// param is [N, K] with inp [B, K], or [N] with inp None; err is [B, N] in both cases.
// err and inp share a dtype; param shares it too, or is its float32 master copy.
void check_factors(const char* op, const at::Tensor& param, const at::Tensor& err,
                   const c10::optional<at::Tensor>& inp) {
  check_cuda(op, "param", param, param);
  check_cuda(op, "err", err, param);
  check_float(op, "err", err);
  check_param_contiguous(op, param);
  check_param_dtype(op, "param", param.scalar_type(), err.scalar_type());
  check_err_shape(op, param, err);
  if (!inp.has_value()) return check_bias_param(op, param);
  check_cuda(op, "inp", *inp, param);
  check_weight_factors(op, param, err, *inp);
  check_same_dtype(op, "inp", *inp, "err", err);
}

// out = a b on cuBLAS, out in a's dtype or (bf16/fp16 a, b) in float32.
void gemm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (out.scalar_type() == a.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    at::mm_out(out, a, b, out.scalar_type());
  }
}

// Calls body(grad, offset) for consecutive pieces of the gradient: grad is a contiguous
// tensor of the parameter's math type whose elements belong at flat `offset` of param.
template <typename Body>
void for_each_grad_tile(const at::Tensor& param, const at::Tensor& err, const c10::optional<at::Tensor>& inp,
                        const Body& body) {
  const at::ScalarType acc = at::toOpMathType(param.scalar_type());
  if (!inp.has_value()) {  // a bias: its gradient is only [N]
    body(at::sum(err, {0}, /*keepdim=*/false, acc), int64_t(0));
    return;
  }
  const int64_t n = param.size(0), k = param.size(1);
  const int64_t tile_rows = std::min(n, std::max<int64_t>(1, kTileElems / std::max<int64_t>(k, 1)));
  at::Tensor tile = at::empty({tile_rows, k}, err.options().dtype(acc));
  for (int64_t r0 = 0; r0 < n; r0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, n - r0);
    at::Tensor out = tile.narrow(0, 0, rows);
    gemm_into(out, err.narrow(1, r0, rows).t(), *inp);
    body(out, r0 * k);
  }
}

void sgd_update_cuda(const at::Tensor& param, const at::Tensor& err, const c10::optional<at::Tensor>& inp,
                     const c10::optional<at::Tensor>& momentum_buffer, double lr, double momentum, double dampening,
                     double weight_decay, bool nesterov, bool maximize, bool first_step) {
  check_factors("sgd_update_", param, err, inp);
  check_momentum_buffer_given(momentum, momentum_buffer);
  const bool has_momentum = momentum != 0;
  if (has_momentum) check_state("sgd_update_", "momentum_buffer", *momentum_buffer, param);
  const c10::cuda::CUDAGuard guard(param.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sgd_update_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const Sgd<A> o{A(lr), A(momentum), A(dampening), A(weight_decay), nesterov, maximize, first_step, has_momentum};
    scalar_t* p = param.data_ptr<scalar_t>();
    scalar_t* buf = has_momentum ? momentum_buffer->data_ptr<scalar_t>() : nullptr;
    for_each_grad_tile(param, err, inp, [&](const at::Tensor& g, int64_t offset) {
      if (g.numel() == 0) return;
      sgd_kernel<scalar_t><<<blocks_for(g.numel()), kThreads, 0, stream()>>>(
          p + offset, buf ? buf + offset : nullptr, g.data_ptr<A>(), g.numel(), o);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void adam_update_cuda(const at::Tensor& param, const at::Tensor& err, const c10::optional<at::Tensor>& inp,
                      const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2,
                      double eps, double weight_decay, bool decoupled, bool maximize, int64_t step) {
  check_factors("adam_update_", param, err, inp);
  check_state("adam_update_", "exp_avg", exp_avg, param);
  check_state("adam_update_", "exp_avg_sq", exp_avg_sq, param);
  check_adam_step(step);
  const c10::cuda::CUDAGuard guard(param.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "adam_update_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const Adam<A> o{adam_scalars<A>(lr, beta1, beta2, eps, weight_decay, step), decoupled, maximize};
    scalar_t* p = param.data_ptr<scalar_t>();
    scalar_t* m = exp_avg.data_ptr<scalar_t>();
    scalar_t* v = exp_avg_sq.data_ptr<scalar_t>();
    for_each_grad_tile(param, err, inp, [&](const at::Tensor& g, int64_t offset) {
      if (g.numel() == 0) return;
      adam_kernel<scalar_t><<<blocks_for(g.numel()), kThreads, 0, stream()>>>(
          p + offset, m + offset, v + offset, g.data_ptr<A>(), g.numel(), o);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(localprop, CUDA, m) {
  m.impl("sgd_update_", &cuda::sgd_update_cuda);
  m.impl("adam_update_", &cuda::adam_update_cuda);
}

}  // namespace localprop
