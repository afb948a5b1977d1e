// The one place where localprop's operator schemas are declared. Backends add
// implementations with TORCH_LIBRARY_IMPL (cpu/, cuda/); the Python side adds
// fake (meta) kernels in localprop/ops so torch.compile can trace them.
#include <Python.h>
#include <torch/library.h>

// Importing localprop._C loads this library, whose static initialisers register
// the ops; the module itself is empty (it needs no pybind11).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(localprop, m) {
  // Transform of a linear node: z = u W^T + b, h = act(z).
  // aux keeps only what the error step needs: a packed 1-bit mask for ReLU
  // (uint8 [B, ceil(N/8)]), z for GELU, nothing (an empty tensor) otherwise.
  m.def("transform(Tensor u, Tensor weight, Tensor? bias, int activation) -> (Tensor h, Tensor aux)");

  // Head and error of a node: logits = h A^T + c (h itself when A is None), mean
  // cross-entropy against y, dlogits = (softmax - onehot) / B, g = dlogits A,
  // err = g * act'(z) from (h, aux), and message = err W when weight is given
  // (an empty tensor otherwise). Outputs never alias each other or the inputs.
  m.def("head_error(Tensor h, Tensor aux, Tensor? head_weight, Tensor? head_bias, Tensor y, "
        "int activation, Tensor? weight) -> (Tensor loss, Tensor dlogits, Tensor err, Tensor message)");

  // Local updates with torch.optim's exact semantics, applied in place, with the
  // gradient given by its factors: grad = err^T inp ([N, K], for a weight) or
  // grad = sum_b err ([N], for a bias, inp = None). The gradient is never
  // materialised whole. State tensors are torch.optim's own (momentum_buffer;
  // exp_avg, exp_avg_sq) and are updated in place.
  //   SGD: first_step means the momentum buffer is initialised to d_p (torch's rule).
  m.def("sgd_update_(Tensor(a!) param, Tensor err, Tensor? inp, Tensor(b!)? momentum_buffer, float lr, "
        "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, bool first_step) -> ()");
  //   Adam / AdamW (decoupled=True): step is the step count after this update (>= 1).
  m.def("adam_update_(Tensor(a!) param, Tensor err, Tensor? inp, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool maximize, "
        "int step) -> ()");
}
