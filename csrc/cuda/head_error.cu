// CUDA head-and-error of a node. The GEMMs (logits = h A^T + c, g = dlogits A and the
// message err W) go to cuBLAS; between them, three kernels:
//   - softmax-CE, one block per row: turns the logits into dlogits in place (no
//     probabilities tensor) and writes the row's loss;
//   - the loss reduction, one block, in row order so the loss is deterministic;
//   - the slope pass, err = g * act'(z) in place, reading the transform's aux.
#include "common.cuh"
#include "../op_args.h"

namespace localprop {
namespace cuda {
namespace {

// logits [rows, classes] (contiguous) -> dlogits = (softmax - onehot) / rows, in place
// when dlogits == logits; row_loss[r] = logsumexp(row) - row[y[r]], in opmath.
template <typename T>
__global__ void softmax_ce_kernel(const T* logits, T* dlogits, const int64_t* __restrict__ y,
                                  at::opmath_type<T>* __restrict__ row_loss, int64_t classes, int64_t rows) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t scratch[32];
  const int64_t r = blockIdx.x;
  const T* in = logits + r * classes;
  T* out = dlogits + r * classes;
  const int64_t label = y[r];
  // A device assert instead of a host check: checking on the host would cost a
  // device-to-host copy and a sync every step (F.cross_entropy asserts the same way).
  CUDA_KERNEL_ASSERT(label >= 0 && label < classes);
  acc_t top = -INFINITY;
  for (int64_t j = threadIdx.x; j < classes; j += blockDim.x) top = max(top, static_cast<acc_t>(in[j]));
  top = block_reduce<acc_t, true>(top, scratch);
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < classes; j += blockDim.x) sum += exp(static_cast<acc_t>(in[j]) - top);
  sum = block_reduce<acc_t, false>(sum, scratch);
  const acc_t target = static_cast<acc_t>(in[label]);
  const acc_t scale = acc_t(1) / (sum * acc_t(rows)), inv_rows = acc_t(1) / acc_t(rows);
  // every thread has read in[label] (above) before any thread overwrites it (below)
  __syncthreads();
  for (int64_t j = threadIdx.x; j < classes; j += blockDim.x) {
    const acc_t p = exp(static_cast<acc_t>(in[j]) - top) * scale;
    out[j] = static_cast<T>(j == label ? p - inv_rows : p);
  }
  if (threadIdx.x == 0) row_loss[r] = log(sum) + top - target;
}

// loss = mean of row_loss, summed by one block in a fixed order.
template <typename T>
__global__ void mean_kernel(const at::opmath_type<T>* __restrict__ row_loss, int64_t rows, T* __restrict__ loss) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t scratch[32];
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) sum += row_loss[i];
  sum = block_reduce<acc_t, false>(sum, scratch);
  if (threadIdx.x == 0) *loss = static_cast<T>(sum / acc_t(rows));
}

// err = g * act'(z), elementwise on [rows, n] (err may be g itself). `slope` is h
// (tanh, sigmoid), z (GELU) or the packed ReLU mask [rows, ceil(n/8)].
template <typename T>
__global__ void slope_kernel(const T* g, const void* __restrict__ slope, T* err, int64_t rows, int64_t n,
                             int64_t act) {
  using acc_t = at::opmath_type<T>;
  const int64_t total = rows * n, mask_cols = (n + 7) / 8;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    if (act == kRelu) {
      const int64_t r = i / n, c = i % n;
      const uint8_t byte = static_cast<const uint8_t*>(slope)[r * mask_cols + c / 8];
      err[i] = (byte >> (c % 8)) & 1 ? g[i] : T(0);
    } else {
      const acc_t s = activation_grad(static_cast<acc_t>(static_cast<const T*>(slope)[i]), act);
      err[i] = static_cast<T>(static_cast<acc_t>(g[i]) * s);
    }
  }
}

void check_aux(const HeadErrorArgs& a) {
  if (a.act == kRelu) {
    check_relu_aux(a);
  } else if (a.act == kGelu) {
    TORCH_CHECK(a.aux.scalar_type() == a.h.scalar_type() && a.aux.sizes() == a.h.sizes(),
                "head_error: GELU needs aux = z, ", a.h.scalar_type(), " ", a.h.sizes(), ", got ",
                a.aux.scalar_type(), " ", a.aux.sizes());
  }
  if (a.act == kRelu || a.act == kGelu) check_cuda("head_error", "aux", a.aux, a.h);
}

void check_head(const HeadErrorArgs& a) {
  check_head_bias_has_head(a);
  if (!a.head_weight.has_value()) return;
  check_cuda("head_error", "head_weight", *a.head_weight, a.h);
  check_head_weight_shape(a);
  if (a.head_bias.has_value()) {
    check_cuda("head_error", "head_bias", *a.head_bias, a.h);
    check_head_bias_shape(a);
  }
}

// The shape rules (op_args.h) with this backend's device and dtype rules between them.
void check_head_error_args(const HeadErrorArgs& a) {
  check_cuda("head_error", "h", a.h, a.h);
  check_float("head_error", "h", a.h);
  check_head_error_h(a);
  check_activation_code("head_error", a.act);
  check_cuda("head_error", "y", a.y, a.h);
  check_head_error_y_shape(a);
  TORCH_CHECK(!at::isFloatingType(a.y.scalar_type()) && !at::isComplexType(a.y.scalar_type()) &&
                  a.y.scalar_type() != at::kBool,
              "head_error: y must hold integer labels, got ", a.y.scalar_type());
  check_head(a);
  if (a.weight.has_value()) {
    check_cuda("head_error", "weight", *a.weight, a.h);
    check_head_error_weight_shape(a);
  }
  check_aux(a);
}

// Logits in a fresh contiguous tensor that the CE kernel may overwrite, or h itself
// (read only: the kernel then writes dlogits elsewhere). `head` is A in h's dtype.
at::Tensor logits_of(const HeadErrorArgs& a, const at::Tensor& h, const at::Tensor& head) {
  if (!a.head_weight.has_value()) return h;
  if (!a.head_bias.has_value()) return at::mm(h, head.t());
  return at::addmm(in_compute_dtype("head_error", "head_bias", *a.head_bias, h.scalar_type()), h, head.t());
}

// (loss [], dlogits [B, C]) from the logits by the CE and mean kernels.
std::tuple<at::Tensor, at::Tensor> softmax_ce(const at::Tensor& logits, const at::Tensor& y, bool in_place) {
  const int64_t rows = logits.size(0), classes = logits.size(1);
  const at::Tensor labels = y.to(at::kLong).contiguous();
  at::Tensor dlogits = in_place ? logits : at::empty_like(logits, at::MemoryFormat::Contiguous);
  at::Tensor loss = at::empty({}, logits.options());
  const at::ScalarType acc = at::toOpMathType(logits.scalar_type());
  at::Tensor row_loss = at::empty({rows}, logits.options().dtype(acc));
  // enough threads for a row of C classes, at least one warp, at most kThreads
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (classes + 31) / 32 * 32)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "head_error_cuda_ce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    softmax_ce_kernel<scalar_t><<<static_cast<unsigned>(rows), threads, 0, stream()>>>(
        logits.data_ptr<scalar_t>(), dlogits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(),
        row_loss.data_ptr<acc_t>(), classes, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mean_kernel<scalar_t><<<1, kThreads, 0, stream()>>>(row_loss.data_ptr<acc_t>(), rows, loss.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, dlogits};
}

// err = g * act'(z), written over g when g is a fresh buffer, else into a new tensor.
at::Tensor apply_slope(const at::Tensor& g, bool g_is_fresh, const at::Tensor& h, const at::Tensor& aux, int64_t act) {
  at::Tensor err = g_is_fresh ? g : at::empty_like(g, at::MemoryFormat::Contiguous);
  if (act == kNone) return g_is_fresh ? err : err.copy_(g);
  const at::Tensor slope = (act == kRelu || act == kGelu) ? aux.contiguous() : h;
  if (err.numel() == 0) return err;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "head_error_cuda_slope", [&] {
    slope_kernel<scalar_t><<<blocks_for(err.numel()), kThreads, 0, stream()>>>(
        g.data_ptr<scalar_t>(), slope.data_ptr(), err.data_ptr<scalar_t>(), err.size(0), err.size(1), act);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return err;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_error_cuda(
    const at::Tensor& h_in, const at::Tensor& aux, const c10::optional<at::Tensor>& head_weight,
    const c10::optional<at::Tensor>& head_bias, const at::Tensor& y, int64_t act,
    const c10::optional<at::Tensor>& weight) {
  const HeadErrorArgs a{h_in, aux, head_weight, head_bias, y, act, weight};
  check_head_error_args(a);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  const bool has_head = head_weight.has_value();
  const at::ScalarType dt = h.scalar_type();
  const at::Tensor head = has_head ? in_compute_dtype("head_error", "head_weight", *head_weight, dt) : at::Tensor();
  auto [loss, dlogits] = softmax_ce(logits_of(a, h, head), y, /*in_place=*/has_head);
  // Without a head, g is dlogits itself and err gets its own storage.
  const at::Tensor g = has_head ? at::mm(dlogits, head) : dlogits;
  at::Tensor err = apply_slope(g, has_head, h, aux, act);
  at::Tensor message = weight.has_value() ? at::mm(err, in_compute_dtype("head_error", "weight", *weight, dt))
                                          : at::empty({0}, h.options());
  return {loss, dlogits, err, message};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(localprop, CUDA, m) { m.impl("head_error", &cuda::head_error_cuda); }

}  // namespace localprop
