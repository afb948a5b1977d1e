"""The Triton backend of the fused ops against the float64 PyTorch references.

Tolerance (as flash-attention's tests): a kernel's max error against the float64 truth
is at most twice PyTorch's own max error in the same dtype, plus two ulps at the output's
scale for the final rounding, which PyTorch can happen to avoid on tiny sizes. PyTorch's
float64 error cannot be measured against a float64 truth, so for float64 outputs its
float32 error is scaled by the ratio of the two dtypes' eps. Without CUDA everything runs
in Triton's interpreter (see conftest.py), so the shapes are small and deliberately odd.
"""
import functools

import pytest
import torch

pytest.importorskip("triton", reason="the triton backend needs the triton package (pip install triton)")

import localprop as lp  # noqa: E402
from localprop.kernels import head_error as k_head_error  # noqa: E402
from localprop.kernels import transform as k_transform  # noqa: E402
from localprop.kernels import update as k_update  # noqa: E402
from localprop.ops import head_error_ref, transform_ref  # noqa: E402
from localprop.ops.activation import CODES, pack_mask  # noqa: E402

DTYPES = [torch.float32, torch.float64]
ACTIVATIONS = list(CODES)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_within_2x(out, truth, pytorch, what=""):
    """out: the kernel's result; truth: the float64 reference; pytorch: PyTorch's result
    in out's dtype (float32 when out is float64, see the module docstring)."""
    assert not out.isnan().any(), f"{what}: NaN, an element was never written"
    eps = torch.finfo(out.dtype).eps
    truth = truth.double()
    torch_err = (pytorch.double() - truth).abs().max().item() * eps / torch.finfo(pytorch.dtype).eps
    err = (out.double() - truth).abs().max().item()
    tol = 2 * torch_err + 2 * eps * truth.abs().max().item()
    assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g} (PyTorch's own: {torch_err:.3g})"


def cast(x, dtype):
    """Floating tensors (and None) in ``dtype``; labels and masks unchanged."""
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def references(fn, dtype, *args):
    """(float64 truth, PyTorch's result in dtype; float32 for float64) of fn(*args)."""
    lower = torch.float32 if dtype == torch.float64 else dtype
    return fn(*(cast(a, torch.float64) for a in args)), fn(*(cast(a, lower) for a in args))


def strided(t, enabled=True):
    """The same values as t in a view with stride 2 along the last dim; the gaps hold NaN
    (integers: their maximum), so a kernel that ignores the strides reads garbage."""
    if t is None or not enabled:
        return t
    fill = float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).max
    big = t.new_full((*t.shape[:-1], 2 * t.shape[-1]), fill)
    big[..., ::2] = t
    return big[..., ::2]


# --- transform ------------------------------------------------------------------------

@pytest.mark.parametrize("strided_inputs", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,N", [(1, 7, 37), (37, 129, 7), (7, 1, 129), (129, 37, 1)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_transform(poison, activation, B, K, N, dtype, strided_inputs):
    torch.manual_seed(B * 1000 + K + N)
    u, w, b = torch.randn(B, K, dtype=dtype), torch.randn(N, K, dtype=dtype) / K ** 0.5, torch.randn(N, dtype=dtype)
    h, aux = k_transform.transform(strided(u, strided_inputs), strided(w, strided_inputs),
                                   strided(b, strided_inputs), CODES[activation])
    (h64, aux64), (h_pt, aux_pt) = references(lambda *a: transform_ref(*a, activation), dtype, u, w, b)
    assert h.shape == (B, N) and h.dtype == dtype
    assert_within_2x(h, h64, h_pt, "h")
    if activation == "relu":
        assert aux.dtype == torch.uint8 and torch.equal(aux, pack_mask(h > 0)), "mask bits (or padding) wrong"
    elif activation == "gelu":
        assert_within_2x(aux, aux64, aux_pt, "z")
    else:
        assert aux.numel() == 0


def test_transform_without_bias(poison):
    torch.manual_seed(1)
    u, w = torch.randn(5, 9), torch.randn(17, 9)
    h, aux = k_transform.transform(u, w, None, CODES["relu"])
    (h64, _), (h_pt, _) = references(lambda *a: transform_ref(*a, None, "relu"), torch.float32, u, w)
    assert_within_2x(h, h64, h_pt, "h")
    assert torch.equal(aux, pack_mask(h > 0))


# --- head and error -------------------------------------------------------------------

# (B, N, C or None for no head, head bias, K of the message or None)
HEAD_CASES = [(7, 37, 3, True, 5), (37, 7, 129, False, None), (1, 10, None, False, 1), (16, 129, 7, True, 37)]


@pytest.mark.parametrize("strided_inputs", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,C,has_bias,K", HEAD_CASES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_head_error(poison, activation, B, N, C, has_bias, K, dtype, strided_inputs):
    torch.manual_seed(B * 1000 + N)
    u, w_in = torch.randn(B, 11, dtype=dtype), torch.randn(N, 11, dtype=dtype) / 11 ** 0.5
    h, aux = transform_ref(u, w_in, None, activation)
    a = None if C is None else torch.randn(C, N, dtype=dtype) / N ** 0.5
    c = torch.randn(C, dtype=dtype) if has_bias else None
    w = None if K is None else torch.randn(N, K, dtype=dtype)
    y = torch.randint(0, N if C is None else C, (B,))
    s = functools.partial(strided, enabled=strided_inputs)
    y_in = torch.stack([y, y], 1)[:, 0] if strided_inputs else y
    out = k_head_error.head_error(s(h), s(aux) if aux.dim() == 2 else aux, s(a), s(c), y_in,
                                  CODES[activation], s(w))
    truth, pt = references(lambda h_, aux_, a_, c_, w_: head_error_ref(h_, aux_, a_, c_, y, activation, w_),
                           dtype, h, aux, a, c, w)
    for name, o, t, p in zip(("loss", "dlogits", "err"), out, truth, pt):
        assert o.dtype == dtype
        assert_within_2x(o, t, p, name)
    if w is None:
        assert out[3].numel() == 0
    else:
        assert_within_2x(out[3], truth.message, pt.message, "message")
    ptrs = [t.data_ptr() for t in out[1:] if t.numel()]
    assert len(set(ptrs)) == len(ptrs), "outputs alias each other"
    assert h.data_ptr() not in ptrs


# --- updates --------------------------------------------------------------------------

OPTIMIZERS = [
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True)),
    (torch.optim.Adam, dict(lr=0.01, weight_decay=0.1)),
    (torch.optim.Adam, dict(lr=0.01, betas=(0.3, 0.9), maximize=True)),  # lerp weight >= 0.5
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
]
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")


def fused_step(opt_cls, hp, state, param, err, inp, step):
    """One kernel update of param, keeping torch.optim's state in ``state``."""
    if opt_cls is torch.optim.SGD:
        momentum, first = hp.get("momentum", 0), "momentum_buffer" not in state
        if momentum and first:
            state["momentum_buffer"] = torch.empty_like(param)  # NaN under poison: must be written
        k_update.sgd_update_(param, err, inp, state.get("momentum_buffer"), hp["lr"], momentum,
                             hp.get("dampening", 0), hp.get("weight_decay", 0), hp.get("nesterov", False),
                             hp.get("maximize", False), first)
        return
    if not state:
        state.update(exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
    beta1, beta2 = hp.get("betas", (0.9, 0.999))
    k_update.adam_update_(param, err, inp, state["exp_avg"], state["exp_avg_sq"], hp["lr"], beta1, beta2,
                          hp.get("eps", 1e-8), hp.get("weight_decay", 0), opt_cls is torch.optim.AdamW,
                          hp.get("maximize", False), step)


def torch_optim_run(opt_cls, hp, dtype, w, b, batches):
    """torch.optim's single-tensor implementation on copies of (w, b) in dtype."""
    params = [w.to(dtype).clone().requires_grad_(), b.to(dtype).clone().requires_grad_()]
    opt = opt_cls(params, foreach=False, **hp)
    for err, inp in batches:
        err, inp = err.to(dtype), inp.to(dtype)
        params[0].grad, params[1].grad = err.t() @ inp, err.sum(0)
        opt.step()
    return [(p.detach(), opt.state[p]) for p in params]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,K,strided_inputs", [(37, 7, 129, False), (1, 37, 7, True), (7, 1, 1, False),
                                                  (16, 33, 17, True)])
@pytest.mark.parametrize("opt_cls,hp", OPTIMIZERS, ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_update_matches_torch_optim(poison, opt_cls, hp, B, N, K, strided_inputs, dtype):
    torch.manual_seed(B * 1000 + N * 10 + K)
    w, b = torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
    batches = [(torch.randn(B, N, dtype=dtype), torch.randn(B, K, dtype=dtype)) for _ in range(3)]
    s = functools.partial(strided, enabled=strided_inputs)
    params, states = [s(w.clone()), s(b.clone())], [{}, {}]
    for step, (err, inp) in enumerate(batches, start=1):
        for param, state, x in zip(params, states, (s(inp), None)):
            fused_step(opt_cls, hp, state, param, s(err), x, step)
    truth = torch_optim_run(opt_cls, hp, torch.float64, w, b, batches)
    pt = torch_optim_run(opt_cls, hp, torch.float32 if dtype == torch.float64 else dtype, w, b, batches)
    for name, param, state, (p64, st64), (p_pt, st_pt) in zip(("weight", "bias"), params, states, truth, pt):
        assert_within_2x(param, p64, p_pt, name)
        for key in STATE_KEYS:
            if key in st64:
                assert_within_2x(state[key], st64[key], st_pt[key], f"{name} {key}")


def test_update_needs_a_buffer_for_momentum():
    p = torch.zeros(3)
    with pytest.raises(ValueError, match="momentum_buffer"):
        k_update.sgd_update_(p, torch.ones(2, 3), None, None, 0.1, 0.9, 0.0, 0.0, False, False, True)


# --- torch.library registration ---------------------------------------------------

def opcheck_cases():
    u, w, b = torch.randn(5, 9), torch.randn(17, 9), torch.randn(17)
    h, a, c, y = torch.randn(5, 17), torch.randn(3, 17), torch.randn(3), torch.randint(0, 3, (5,))
    return [
        ("transform_triton", (u, w, b, CODES["relu"])),
        ("head_error_triton", (h, h.new_empty(0), a, c, y, CODES[None], torch.randn(17, 4))),
        ("sgd_update_triton", (w.clone(), torch.randn(5, 17), u, torch.zeros(17, 9), 0.1, 0.9, 0.0, 0.0,
                               False, False, False)),
        ("adam_update_triton", (b.clone(), torch.randn(5, 17), None, torch.zeros(17), torch.zeros(17), 0.1,
                                0.9, 0.99, 1e-8, 0.0, True, False, 2)),
    ]


@pytest.mark.parametrize("name,args", opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    # AOT dispatch traces the op's body, where wrap_triton intercepts compiled kernels but
    # not interpreted ones, so on CPU it is left to the GPU run of this test.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if torch.cuda.is_available():
        utils += ("test_aot_dispatch_dynamic",)
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(torch.ops.localprop, name).default, args, test_utils=utils)


# --- whole training -------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", [functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
                                       functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.01)],
                         ids=["sgd-momentum", "adamw"])
def test_training_agrees_with_reference(optimizer):
    x, y = torch.randn(24, 13), torch.randint(0, 5, (24,))
    nets = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        nets[backend] = lp.LocalSequential(
            lp.LocalLinear(13, 33), lp.LocalLinear(33, 17, activation="tanh"),
            lp.LocalLinear(17, 5, activation=None),
            rule="greedy", num_classes=5, optimizer=optimizer, backend=backend)
        for _ in range(3):
            nets[backend].train_step(x, y)
    for (name, p), q in zip(nets["triton"].named_parameters(), nets["reference"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


# --- GPU: half precision, float32 master weights --------------------------------------

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_transform_bf16_gpu(activation):
    torch.manual_seed(0)
    u, w, b = (torch.randn(*s, device="cuda") for s in ((129, 257), (67, 257), (67,)))
    u, w, b = u.bfloat16(), (w / 16).bfloat16(), b.bfloat16()
    h, aux = k_transform.transform(u, w, b, CODES[activation])
    (h64, _), (h_pt, _) = references(lambda *a: transform_ref(*a, activation), torch.bfloat16, u, w, b)
    assert_within_2x(h, h64, h_pt, "h")


@pytest.mark.gpu
@gpu
def test_head_error_bf16_gpu():
    torch.manual_seed(0)
    h = torch.randn(129, 67, device="cuda").bfloat16()
    a, c, w = torch.randn(10, 67, device="cuda") / 8, torch.randn(10, device="cuda"), torch.randn(67, 33, device="cuda")
    a, c, w = a.bfloat16(), c.bfloat16(), w.bfloat16()
    y = torch.randint(0, 10, (129,), device="cuda")
    empty = h.new_empty(0)
    out = k_head_error.head_error(h, empty, a, c, y, CODES[None], w)
    truth, pt = references(lambda h_, a_, c_, w_: head_error_ref(h_, empty, a_, c_, y, None, w_),
                           torch.bfloat16, h, a, c, w)
    for name, o, t, p in zip(("loss", "dlogits", "err", "message"), out, truth, pt):
        assert_within_2x(o, t, p, name)


@pytest.mark.gpu
@gpu
def test_adam_bf16_factors_fp32_master_gpu():
    torch.manual_seed(0)
    w = torch.randn(67, 129, device="cuda")
    err, inp = torch.randn(33, 67, device="cuda").bfloat16(), torch.randn(33, 129, device="cuda").bfloat16()
    m, v, p = torch.zeros_like(w), torch.zeros_like(w), w.clone()
    k_update.adam_update_(p, err, inp, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.0, True, False, 1)
    truth = torch_optim_run(torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.0), torch.float64, w,
                            torch.zeros(67, device="cuda"), [(err.double(), inp.double())])[0][0]
    ref = w.clone().requires_grad_()
    ref.grad = (err.t() @ inp).float()  # PyTorch: the gradient rounded to bf16 by its GEMM
    torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.0, foreach=False).step()
    assert_within_2x(p, truth, ref.detach(), "weight")
