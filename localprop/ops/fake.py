"""Python-side registrations of the C++ ops, imported once the extension has loaded
their schemas (see backends.extension_error): fake (meta) kernels, so torch.compile and
opcheck can trace them, and their autocast behaviour."""
import torch

from .activation import GELU, RELU


@torch.library.register_fake("localprop::transform")
def _transform_fake(u, weight, bias, activation):
    rows, n = u.shape[0], weight.shape[0]
    h = u.new_empty(rows, n)
    if activation == RELU:
        return h, u.new_empty(rows, (n + 7) // 8, dtype=torch.uint8)
    if activation == GELU:
        return h, u.new_empty(rows, n)
    return h, u.new_empty(0)


@torch.library.register_fake("localprop::head_error")
def _head_error_fake(h, aux, head_weight, head_bias, y, activation, weight):
    rows = h.shape[0]
    classes = h.shape[1] if head_weight is None else head_weight.shape[0]
    message = h.new_empty(0) if weight is None else h.new_empty(rows, weight.shape[1])
    return h.new_empty(()), h.new_empty(rows, classes), h.new_empty(h.shape), message


@torch.library.register_fake("localprop::sgd_update_")
def _sgd_update_fake(param, err, inp, momentum_buffer, lr, momentum, dampening, weight_decay,
                     nesterov, maximize, first_step):
    return None


@torch.library.register_fake("localprop::adam_update_")
def _adam_update_fake(param, err, inp, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
                      decoupled, maximize, step):
    return None


# Under autocast, the ops run in float32 on float32 (or lower) inputs, as a matmul on
# autocast's float32 list would: without this the GEMM inside the kernel is autocast to
# bf16 and the kernel gets a dtype it has no code for. float64 is left as it is. The update
# ops are not registered: they write parameters in place, which a cast would copy.
for _op in ("localprop::transform", "localprop::head_error"):
    for _device in ("cpu", "cuda"):
        torch.library.register_autocast(_op, _device, torch.float32)
