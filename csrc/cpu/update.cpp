// CPU local updates with torch.optim's exact formulas (SGD; Adam and AdamW), applied
// in place with the gradient given by its factors. A weight's gradient err^T inp is
// formed one row tile at a time into a small per-thread buffer (BLAS) and consumed at
// once by the elementwise optimizer step while the tile is still in cache, so the
// whole [N, K] gradient is never materialised.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../op_args.h"
#include "../update_math.h"

namespace localprop {
namespace {

// Bytes of gradient per tile (see tile_rows). Each tile's GEMM reads the whole input
// [B, K] again, so small tiles lose at large batch however well they fit in L2: float32
// SGD with momentum on a 1024 x 1024 weight, 1 thread, against GEMM + torch's foreach SGD
// (2-core AMD EPYC): 256 KiB tiles 1.12 / 1.17 / 1.31x at B = 256 / 1024 / 4096, 1 MiB
// 0.99 / 1.03 / 1.04x, 2 MiB 1.00 / 1.01 / 1.01x (2 threads: 1.14 / 1.12 / 1.18x before,
// 1.04 / 0.98 / 0.99x at 2 MiB). So a tile is at least kTileBytes and holds B / 8 rows
// (the input re-read at most 8 times the tile), up to kMaxTileBytes, which bounds the
// memory the update adds per thread.
constexpr int64_t kTileBytes = 1024 * 1024;
constexpr int64_t kMaxTileBytes = 4 * 1024 * 1024;
constexpr int64_t kRowsPerBatch = 8;  // rows per tile >= B / kRowsPerBatch
constexpr int64_t kMinTileRows = 8;

// The optimizer loops below run over one tile: `count` elements of param (and its
// state) and the matching gradient g, one element at a time through update_math.h. Every
// flag is a template parameter so that each loop is branch-free and vectorises; the
// pointers never alias. maximize is a factor sign = -1 on g (exact).

enum MomentumMode { kNoMomentum = 0, kFirstStep = 1, kRunning = 2 };

template <typename T, bool kDecay, int kMomentum, bool kNesterov>
void sgd_loop(T* __restrict__ p, T* __restrict__ buf, const T* __restrict__ g, int64_t count, T sign,
              const SgdScalars<T>& s) {
  for (int64_t i = 0; i < count; ++i) {
    p[i] = sgd_step(p[i], sign * g[i], buf, i, s, kDecay, kMomentum != kNoMomentum, kMomentum == kFirstStep,
                    kNesterov);
  }
}

template <typename T>
using SgdLoop = void (*)(T*, T*, const T*, int64_t, T, const SgdScalars<T>&);

template <typename T, bool kDecay>
SgdLoop<T> pick_sgd_loop(int mode, bool nesterov) {
  if (mode == kNoMomentum) return &sgd_loop<T, kDecay, kNoMomentum, false>;
  if (mode == kFirstStep) return nesterov ? &sgd_loop<T, kDecay, kFirstStep, true> : &sgd_loop<T, kDecay, kFirstStep, false>;
  return nesterov ? &sgd_loop<T, kDecay, kRunning, true> : &sgd_loop<T, kDecay, kRunning, false>;
}

enum DecayMode { kNoDecay = 0, kL2 = 1, kDecoupled = 2 };

// kLerpLow: see adam_step.
template <typename T, int kDecay, bool kLerpLow>
void adam_loop(T* __restrict__ p, T* __restrict__ m, T* __restrict__ v, const T* __restrict__ g, int64_t count,
               T sign, const AdamScalars<T>& s) {
  for (int64_t i = 0; i < count; ++i) {
    adam_step(p[i], m[i], v[i], sign * g[i], s, kDecay != kNoDecay, kDecay == kDecoupled, kLerpLow);
  }
}

template <typename T>
using AdamLoop = void (*)(T*, T*, T*, const T*, int64_t, T, const AdamScalars<T>&);

template <typename T, bool kLerpLow>
AdamLoop<T> pick_adam_loop(int decay) {
  if (decay == kDecoupled) return &adam_loop<T, kDecoupled, kLerpLow>;
  return decay == kL2 ? &adam_loop<T, kL2, kLerpLow> : &adam_loop<T, kNoDecay, kLerpLow>;
}

// param is [N, K] with inp [B, K], or [N] with inp None; err is [B, N] in both cases;
// all three share one dtype, float32 or float64.
void check_factors(const char* op, const at::Tensor& param, const at::Tensor& err,
                   const c10::optional<at::Tensor>& inp) {
  TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kDouble, op,
              ": param must be float32 or float64, got ", param.scalar_type());
  check_param_contiguous(op, param);
  check_err_shape(op, param, err);
  check_same_dtype(op, "err", err, "param", param);
  if (!inp.has_value()) return check_bias_param(op, param);
  check_weight_factors(op, param, err, *inp);
  check_same_dtype(op, "inp", *inp, "param", param);
}

// How many threads a [n, k] update is worth: one per GRAIN_SIZE elements at most, so
// that small parameters (heads, biases, narrow layers) run inline. A parallel region
// costs a thread wake-up and barrier, about as much as the whole update of a
// 16 x 16 weight, and far more when the cores are shared with other work.
int64_t useful_threads(int64_t n, int64_t k) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n * k / at::internal::GRAIN_SIZE));
}

// Rows per gradient tile for a batch of b: kTileBytes, or B / kRowsPerBatch rows up to
// kMaxTileBytes when that is more; at least one tile per useful thread.
int64_t tile_rows(int64_t n, int64_t k, int64_t b, int64_t elem_size, int64_t threads) {
  const int64_t row_bytes = elem_size * k;
  const int64_t for_batch = std::min(b / kRowsPerBatch, kMaxTileBytes / row_bytes);
  const int64_t rows = std::max({kMinTileRows, kTileBytes / row_bytes, for_batch});
  const int64_t per_thread = (n + threads - 1) / threads;
  return std::max<int64_t>(1, std::min({n, per_thread, rows}));
}

// Calls body(grad, offset, count) for consecutive pieces of the gradient, where grad
// points at `count` contiguous elements that belong at flat `offset` of param. Tiles
// run in one parallel region, each thread forming its own tile with a single-threaded
// GEMM and consuming it while it is in that core's cache; one region per call instead
// of a multithreaded GEMM plus an elementwise region per tile, which costs a thread
// barrier each time (and much more when the cores are shared with other work).
template <typename T, typename Body>
void for_each_grad_tile(const at::Tensor& param, const at::Tensor& err, const c10::optional<at::Tensor>& inp,
                        const Body& body) {
  if (!inp.has_value()) {  // a bias: its gradient is only [N]
    const at::Tensor g = err.sum(0);
    body(g.data_ptr<T>(), int64_t(0), g.numel());
    return;
  }
  const int64_t n = param.size(0), k = param.size(1);
  const int64_t threads = useful_threads(n, k);
  const int64_t rows_per_tile = tile_rows(n, k, err.size(0), sizeof(T), threads);
  const int64_t tiles = (n + rows_per_tile - 1) / rows_per_tile;
  // chunks of consecutive tiles, one per useful thread (inline when that is one), each
  // with its own tile buffer allocated before the parallel region, not by each thread
  // inside it: the update's peak memory is then the same however the threads' runs
  // happen to overlap in time
  const int64_t per_chunk = (tiles + threads - 1) / threads;
  const int64_t chunks = (tiles + per_chunk - 1) / per_chunk;
  const at::Tensor buffers = at::empty({chunks, rows_per_tile, k}, param.options());
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const at::Tensor tile = buffers[c];
      for (int64_t t = c * per_chunk; t < std::min(tiles, (c + 1) * per_chunk); ++t) {
        const int64_t r0 = t * rows_per_tile, rows = std::min(rows_per_tile, n - r0);
        at::Tensor out = tile.narrow(0, 0, rows);
        at::mm_out(out, err.narrow(1, r0, rows).t(), *inp);
        body(out.data_ptr<T>(), r0 * k, rows * k);
      }
    }
  });
}

void sgd_update_cpu(const at::Tensor& param, const at::Tensor& err, const c10::optional<at::Tensor>& inp,
                    const c10::optional<at::Tensor>& momentum_buffer, double lr, double momentum,
                    double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step) {
  check_factors("sgd_update_", param, err, inp);
  check_momentum_buffer_given(momentum, momentum_buffer);
  const bool has_momentum = momentum != 0;
  if (has_momentum) check_state_like("sgd_update_", "momentum_buffer", *momentum_buffer, param);
  const int mode = !has_momentum ? kNoMomentum : first_step ? kFirstStep : kRunning;
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "sgd_update_cpu", [&] {
    using T = scalar_t;
    // formed in double as torch.optim forms them in Python, then cast as ATen casts them
    const SgdScalars<T> s{T(lr), T(momentum), T(1 - dampening), T(weight_decay)};
    const T sign = T(maximize ? -1 : 1);
    const SgdLoop<T> loop = weight_decay != 0 ? pick_sgd_loop<T, true>(mode, nesterov)
                                              : pick_sgd_loop<T, false>(mode, nesterov);
    T* p = param.data_ptr<T>();
    T* buf = has_momentum ? momentum_buffer->data_ptr<T>() : nullptr;
    for_each_grad_tile<T>(param, err, inp, [&](const T* g, int64_t offset, int64_t count) {
      loop(p + offset, buf ? buf + offset : nullptr, g, count, sign, s);
    });
  });
}

void adam_update_cpu(const at::Tensor& param, const at::Tensor& err, const c10::optional<at::Tensor>& inp,
                     const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2,
                     double eps, double weight_decay, bool decoupled, bool maximize, int64_t step) {
  check_factors("adam_update_", param, err, inp);
  check_state_like("adam_update_", "exp_avg", exp_avg, param);
  check_state_like("adam_update_", "exp_avg_sq", exp_avg_sq, param);
  check_adam_step(step);
  const int decay = weight_decay == 0 ? kNoDecay : decoupled ? kDecoupled : kL2;
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "adam_update_cpu", [&] {
    using T = scalar_t;
    const AdamScalars<T> s = adam_scalars<T>(lr, beta1, beta2, eps, weight_decay, step);
    const T sign = T(maximize ? -1 : 1);
    const AdamLoop<T> loop = s.lerp_weight < T(0.5) ? pick_adam_loop<T, true>(decay) : pick_adam_loop<T, false>(decay);
    T* p = param.data_ptr<T>();
    T* m = exp_avg.data_ptr<T>();
    T* v = exp_avg_sq.data_ptr<T>();
    for_each_grad_tile<T>(param, err, inp, [&](const T* g, int64_t offset, int64_t count) {
      loop(p + offset, m + offset, v + offset, g, count, sign, s);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(localprop, CPU, m) {
  m.impl("sgd_update_", &sgd_update_cpu);
  m.impl("adam_update_", &adam_update_cpu);
}

}  // namespace localprop
