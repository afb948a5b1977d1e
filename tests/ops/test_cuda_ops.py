"""The CUDA backend's ops against their float64 references, on a GPU.

Each op is held to "error against the float64 reference <= 2x PyTorch's own error in
the same dtype" on odd sizes and non-contiguous inputs, in float32 and bfloat16 (with
float32 master parameters too), then checked by opcheck and torch.compile(fullgraph=True),
and a whole greedy training run must agree with the reference backend. Skipped without
a CUDA device, or when localprop._C was built without CUDA.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import localprop as lp
from localprop import ops
from localprop.ops import activation as act
from localprop.ops import backends
from tests.ops.conftest import ACTIVATIONS, LAYOUTS, assert_close_to_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
DTYPES = (torch.float32, torch.bfloat16)
#: (B, K, N): every odd size in every position, and one large enough for many blocks
SHAPES = [(1, 7, 37), (7, 37, 129), (37, 129, 1), (129, 1, 7), (129, 1000, 257)]


@pytest.fixture(autouse=True)
def cuda_backend():
    reason = backends.why_unavailable("cuda", CUDA)
    if reason is not None:
        pytest.skip(reason)


def randn(*shape, dtype, gen, scale=1.0):
    """Random normal values drawn in float64 on the CPU (reproducible), cast, moved to CUDA."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(CUDA)


def on_layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t`` (2-D, on CUDA) with the same values in another layout: "strided" is every
    other column of a wider tensor, "transposed" a column-major copy."""
    if kind == "strided":
        wide = torch.full((t.shape[0], 2 * t.shape[1]), float("nan"), dtype=t.dtype, device=t.device)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t.t().contiguous().t() if kind == "transposed" else t


def poison(numel: int, dtype: torch.dtype) -> None:
    """Fill and free NaN blocks in the caching allocator, so that outputs allocated next
    likely start as NaN and any element an op fails to write shows."""
    blocks = [torch.full((max(numel, 1) + extra,), float("nan"), dtype=dtype, device=CUDA) for extra in (0, 7, 64)]
    del blocks


def up(t):
    """float64 copy of a float tensor (None and integer tensors pass through)."""
    return t.double() if t is not None and t.is_floating_point() else t


def cast(t, dtype):
    return None if t is None else t.to(dtype)


# ---- transform ---------------------------------------------------------------------
def transform_inputs(rows, k, n, dtype, param_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype
    return (randn(rows, k, dtype=dtype, gen=gen), randn(n, k, dtype=param_dtype, gen=gen, scale=k ** -0.5),
            randn(n, dtype=param_dtype, gen=gen))


def check_transform(u, w, b, activation):
    poison(u.shape[0] * w.shape[0], u.dtype)
    h, aux = ops.transform(u, w, b, activation, "cuda")
    h64, aux64 = ops.transform_ref(up(u), up(w), up(b), activation)
    wc, bc = cast(w, u.dtype), cast(b, u.dtype)
    h_same, aux_same = ops.transform_ref(u, wc, bc, activation)
    assert_close_to_ref(h, h64, h_same)
    if activation == "relu":
        # bits may differ from torch's only where z is within torch's own rounding of 0
        z64, z_same = F.linear(up(u), up(w), up(b)), F.linear(u, wc, bc).double()
        slack = 2 * (z_same - z64).abs().max() + torch.finfo(torch.float64).tiny
        differ = act.unpack_mask(aux, h.shape[1]) != act.unpack_mask(aux_same, h.shape[1])
        assert (z64[differ].abs() <= slack).all()
    elif activation == "gelu":
        assert_close_to_ref(aux, aux64, aux_same)
    else:
        assert aux.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_transform_matches_reference(shape, activation, dtype):
    check_transform(*transform_inputs(*shape, dtype), activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_transform_non_contiguous(kind, activation, dtype):
    u, w, b = transform_inputs(37, 129, 7, dtype)
    check_transform(on_layout(u, kind), on_layout(w, kind), b, activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_transform_bf16_with_fp32_master_weights(activation):
    check_transform(*transform_inputs(37, 129, 65, torch.bfloat16, torch.float32), activation)


# ---- head_error --------------------------------------------------------------------
def head_inputs(rows, n, classes, k, dtype, activation, head=True, param_dtype=None, seed=0):
    """(h, aux, A, c, y, W) as a node's transform would leave them; without a head the
    logits are h itself (classes = n). W is None when k is None."""
    gen = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype
    z = randn(rows, n, dtype=torch.float64, gen=gen)
    h, aux = act.apply(z, activation).to(dtype), act.keep_for_grad(z, activation)
    aux = aux.to(dtype) if activation == "gelu" else aux
    a = randn(classes, n, dtype=param_dtype, gen=gen, scale=n ** -0.5) if head else None
    c = randn(classes, dtype=param_dtype, gen=gen) if head else None
    y = torch.randint(0, classes if head else n, (rows,), generator=gen).to(CUDA)
    w = randn(n, k, dtype=param_dtype, gen=gen, scale=k ** -0.5) if k else None
    return h, aux, a, c, y, w


def check_head_error(h, aux, a, c, y, activation, w):
    poison(h.numel(), h.dtype)
    out = ops.head_error(h, aux, a, c, y, activation, w, backend="cuda")
    ref64 = ops.head_error_ref(up(h), up(aux), up(a), up(c), y, activation, up(w))
    same = ops.head_error_ref(h, aux, cast(a, h.dtype), cast(c, h.dtype), y, activation, cast(w, h.dtype))
    for name in ("loss", "dlogits", "err"):
        assert_close_to_ref(getattr(out, name), getattr(ref64, name), getattr(same, name))
    if w is None:
        assert out.message is None
    else:
        assert_close_to_ref(out.message, ref64.message, same.message)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("rows,n,classes,k", [(1, 7, 3, 37), (37, 129, 10, 7), (129, 37, 1000, None)], ids=str)
def test_head_error_matches_reference(rows, n, classes, k, activation, dtype):
    h, aux, a, c, y, w = head_inputs(rows, n, classes, k, dtype, activation)
    check_head_error(h, aux, a, c, y, activation, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "relu", "tanh"])
def test_head_error_without_head(activation, dtype):
    h, aux, _, _, y, w = head_inputs(37, 11, 11, 7, dtype, activation, head=False)
    check_head_error(h, aux, None, None, y, activation, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_head_error_non_contiguous(kind, dtype):
    h, aux, a, c, y, w = head_inputs(37, 129, 10, 7, dtype, "gelu")
    check_head_error(on_layout(h, kind), on_layout(aux, kind), on_layout(a, kind), c, y, "gelu", on_layout(w, kind))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_head_error_bf16_with_fp32_master_weights(activation):
    h, aux, a, c, y, w = head_inputs(37, 129, 10, 7, torch.bfloat16, activation, param_dtype=torch.float32)
    check_head_error(h, aux, a, c, y, activation, w)


# ---- update ------------------------------------------------------------------------
OPTIMIZERS = {
    "sgd": functools.partial(torch.optim.SGD, lr=0.1),
    "sgd-nesterov-wd": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd-dampening-maximize": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.8, dampening=0.3, maximize=True),
    # eps well above fp32 rounding of the gradient: with eps ~ 1e-8, an element whose
    # gradient is ~0 takes a step of +-lr on the sign of a rounding error, in torch too
    "adam": functools.partial(torch.optim.Adam, lr=1e-2, eps=1e-4),
    "adam-wd-maximize": functools.partial(torch.optim.Adam, lr=1e-2, eps=1e-4, betas=(0.8, 0.99), weight_decay=0.1,
                                          maximize=True),
    "adamw": functools.partial(torch.optim.AdamW, lr=1e-2, eps=1e-4, weight_decay=0.1),
}
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")


def update_batches(rows, k, n, dtype, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(randn(rows, n, dtype=dtype, gen=gen, scale=0.1), randn(rows, k, dtype=dtype, gen=gen))
            for _ in range(steps)]


def torch_steps(factory, weight, bias, batches, param_dtype):
    """torch.optim's single-tensor step on params in param_dtype, with gradients formed
    in the batches' dtype (PyTorch's own way) and cast to param_dtype."""
    w = weight.detach().to(param_dtype).requires_grad_()
    b = bias.detach().to(param_dtype).requires_grad_()
    opt = factory([w, b], foreach=False)
    for err, inp in batches:
        w.grad, b.grad = (err.t() @ inp).to(param_dtype), err.sum(0).to(param_dtype)
        opt.step()
    return w.detach(), b.detach(), opt.state[w]


def fused_steps(factory, weight, bias, batches):
    w, b = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())
    opt = factory([w, b])
    for err, inp in batches:
        ops.update(opt, [ops.LinearGrad(w, b, err, inp)], backend="cuda")
    return w.detach(), b.detach(), opt.state[w]


def check_update(factory, batches, param_dtype, rows_k_n):
    _, k, n = rows_k_n
    gen = torch.Generator().manual_seed(1)
    weight, bias = randn(n, k, dtype=param_dtype, gen=gen, scale=k ** -0.5), randn(n, dtype=param_dtype, gen=gen)
    w, b, state = fused_steps(factory, weight, bias, batches)
    w64, b64, state64 = torch_steps(factory, weight, bias, [(up(e), up(i)) for e, i in batches], torch.float64)
    w_same, b_same, state_same = torch_steps(factory, weight, bias, batches, param_dtype)
    assert_close_to_ref(w, w64, w_same)
    assert_close_to_ref(b, b64, b_same)
    for key in STATE_KEYS:
        if key in state64:
            assert_close_to_ref(state[key], state64[key], state_same[key])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("shape", [(37, 129, 7), (1, 7, 37), (129, 1000, 257)], ids=str)
def test_update_matches_reference(shape, optimizer, dtype):
    check_update(OPTIMIZERS[optimizer], update_batches(*shape, dtype), dtype, shape)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_update_bf16_factors_fp32_master_params(optimizer):
    shape = (37, 129, 65)
    check_update(OPTIMIZERS[optimizer], update_batches(*shape, torch.bfloat16), torch.float32, shape)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_update_non_contiguous_factors(kind):
    shape = (37, 129, 7)
    batches = [(on_layout(e, kind), on_layout(i, kind)) for e, i in update_batches(*shape, torch.float32)]
    check_update(OPTIMIZERS["sgd-nesterov-wd"], batches, torch.float32, shape)


def test_update_tiles_a_weight_larger_than_the_workspace():
    """A weight of more than 2^22 elements is updated in several row tiles."""
    shape = (8, 4099, 1025)
    check_update(OPTIMIZERS["adamw"], update_batches(*shape, torch.float32, steps=2), torch.float32, shape)


# ---- opcheck and torch.compile -----------------------------------------------------
def op_samples():
    """(op, args) pairs covering every CUDA op, each with fresh tensors."""
    u, w, b = transform_inputs(7, 37, 13, torch.float32)
    h, aux, a, c, y, wm = head_inputs(7, 13, 5, 11, torch.float32, "relu")
    err, inp = update_batches(7, 37, 13, torch.float32, steps=1)[0]
    state = [torch.zeros_like(w) for _ in range(3)]
    L = torch.ops.localprop
    return [
        (L.transform.default, (u, w, b, act.code("relu"))),
        (L.transform.default, (u, w, None, act.code("gelu"))),
        (L.head_error.default, (h, aux, a, c, y, act.code("relu"), wm)),
        (L.head_error.default, (h, h.new_empty(0), None, None, torch.randint(0, 13, (7,), device=CUDA), 0, None)),
        (L.sgd_update_.default, (w.clone(), err, inp, state[0], 0.1, 0.9, 0.0, 0.01, True, False, True)),
        (L.sgd_update_.default, (b.clone(), err, None, None, 0.1, 0.0, 0.0, 0.0, False, False, False)),
        (L.adam_update_.default, (w.clone(), err, inp, state[1], state[2], 1e-2, 0.9, 0.999, 1e-8, 0.1, True, False,
                                  1)),
    ]


@pytest.mark.parametrize("index", range(7))
def test_opcheck(index):
    op, args = op_samples()[index]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("index", range(7))
def test_torch_compile_fullgraph(index):
    op, args = op_samples()[index]
    clones = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True)
    out, expected = compiled(*args), op(*clones)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close([t for t in args if isinstance(t, torch.Tensor)],
                               [t for t in clones if isinstance(t, torch.Tensor)])


# ---- whole training ----------------------------------------------------------------
def greedy_mlp(backend, optimizer):
    torch.manual_seed(0)
    sizes = [(20, 64, "relu"), (64, 48, "gelu"), (48, 10, None)]
    nodes = [lp.LocalLinear(i, o, activation=a, device=CUDA) for i, o, a in sizes]
    return lp.LocalSequential(*nodes, rule="greedy", num_classes=10, optimizer=optimizer, backend=backend)


@pytest.mark.parametrize("optimizer", ["sgd-nesterov-wd", "adamw"])
def test_greedy_training_agrees_with_reference(optimizer):
    nets = {b: greedy_mlp(b, OPTIMIZERS[optimizer]) for b in ("cuda", "reference")}
    gen = torch.Generator().manual_seed(2)
    for step in range(10):
        x, y = torch.randn(65, 20, generator=gen).to(CUDA), torch.randint(0, 10, (65,), generator=gen).to(CUDA)
        losses = {b: net.train_step(x, y).losses for b, net in nets.items()}
        for node, loss in losses["reference"].items():
            assert losses["cuda"][node] == pytest.approx(loss, rel=1e-4, abs=1e-6), f"step {step}, node {node}"
    for p, q in zip(nets["cuda"].parameters(), nets["reference"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
