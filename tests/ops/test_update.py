"""The fused update (SGD, Adam, AdamW from the gradient's factors) on every backend
against torch.optim itself: parameters and optimizer state (keys, types, values) after
several steps, within twice PyTorch's own error in the same dtype; then the first-step
momentum buffer, switching with torch.optim and state_dict, the fallback for other
optimizers, whole greedy training, argument checks, opcheck and torch.compile."""
import copy
import functools
import warnings

import pytest
import torch

import localprop as lp
from localprop import ops
from localprop.ops import fused_update
from tests.ops.cases import (BF16, F32, F64, LARGE_SIZE, assert_matches, backend_param, device, dtypes,
                             kernels, layout, make_gen, opcheck_utils, per_backend, small, update_inputs)

SGD, Adam, AdamW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW
OPTIMIZERS = {
    "sgd": functools.partial(SGD, lr=0.1),
    "momentum": functools.partial(SGD, lr=0.1, momentum=0.9),
    "nesterov": functools.partial(SGD, lr=0.1, momentum=0.9, nesterov=True),
    "dampening+wd": functools.partial(SGD, lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.01),
    "momentum+dampening+wd": functools.partial(SGD, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "maximize+tensor_lr": functools.partial(SGD, lr=torch.tensor(0.05), momentum=0.5, weight_decay=0.1,
                                            maximize=True),
    "nesterov+wd": functools.partial(SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "nesterov+wd+maximize": functools.partial(SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01,
                                              maximize=True),
    "dampening+maximize": functools.partial(SGD, lr=0.1, momentum=0.8, dampening=0.3, maximize=True),
    "adam": functools.partial(Adam, lr=0.01),
    "adam+wd": functools.partial(Adam, lr=0.01, weight_decay=0.1),
    "adam+wd+maximize": functools.partial(Adam, lr=0.01, betas=(0.3, 0.99), weight_decay=0.05, maximize=True),
    "adam+maximize": functools.partial(Adam, lr=0.01, betas=(0.3, 0.9), maximize=True),  # lerp weight >= 0.5
    "adamw": functools.partial(AdamW, lr=0.01, weight_decay=0.1),
    # eps well above float32 rounding of the gradient: with eps ~ 1e-8, an element whose
    # gradient is ~0 takes a step of +-lr on the sign of a rounding error (cuBLAS's too)
    "adam-eps": functools.partial(Adam, lr=1e-2, eps=1e-4),
    "adam-eps+wd+maximize": functools.partial(Adam, lr=1e-2, eps=1e-4, betas=(0.8, 0.99), weight_decay=0.1,
                                              maximize=True),
    "adamw-eps": functools.partial(AdamW, lr=1e-2, eps=1e-4, weight_decay=0.1),
}
#: the cuda backend's (float32 and bfloat16 only; the eps ~ 1e-8 ones fail there, see above);
#: the other backends take the rest
CUDA_OPTIMIZERS = ("sgd", "nesterov+wd", "dampening+maximize", "adam-eps", "adam-eps+wd+maximize", "adamw-eps")
CPU_OPTIMIZERS = tuple(name for name in OPTIMIZERS if name == "sgd" or name not in CUDA_OPTIMIZERS)
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")

#: (B, N, K) small enough for Triton's interpreter, with the layout of the factors (and
#: the parameters themselves when strided)
SMALL = [((37, 7, 129), "contiguous"), ((1, 37, 7), "strided"), ((7, 1, 1), "contiguous"),
         ((16, 33, 17), "strided")]
#: the others also take 1 x 1 x 1, a weight of several row tiles on the CPU (300 rows of
#: LARGE_SIZE: 1 MiB tiles of 131 float64 or 262 float32 rows), and transposed factors;
#: cuda one large enough for many blocks
SHAPES = SMALL + [((1, 1, 1), "contiguous"), ((7, 37, 129), "contiguous"), ((37, 129, 200), "contiguous"),
                  ((5, 300, LARGE_SIZE), "contiguous"), ((7, 37, 129), "strided"), ((7, 37, 129), "transposed"),
                  ((37, 7, 129), "strided"), ((37, 7, 129), "transposed")]
CUDA_SHAPES = SHAPES + [((129, 257, LARGE_SIZE), "contiguous")]


def matrix(backend):
    """(dtype, param dtype, shape, layout, optimizer) of every case of ``backend``."""
    names = CUDA_OPTIMIZERS if backend == "cuda" else CPU_OPTIMIZERS
    shapes = SMALL if small(backend) else CUDA_SHAPES if backend == "cuda" else SHAPES
    cases = [(d, None, s, k, o) for d in dtypes(backend) for s, k in shapes for o in names]
    if backend == "cuda":  # bfloat16 factors, float32 master parameters
        cases += [(BF16, F32, (37, 65, 129), "contiguous", o) for o in names]
    if backend == "triton" and device(backend).type == "cuda":
        cases.append((BF16, F32, (33, 67, 129), "contiguous", "adamw"))
    return cases


def torch_steps(make, w, b, batches, dtype, factor_dtype):
    """torch.optim's single-tensor step on copies of (w, b) in ``dtype``, with gradients
    formed in ``factor_dtype`` (PyTorch's own way) and cast to ``dtype``."""
    params = [t.detach().to(dtype, copy=True).requires_grad_() for t in (w, b)]
    opt = make(params, foreach=False)
    for err, inp in batches:
        err, inp = err.to(factor_dtype), inp.to(factor_dtype)
        params[0].grad, params[1].grad = (err.t() @ inp).to(dtype), err.sum(0).to(dtype)
        opt.step()
    return params, opt


def fused_steps(make, backend, w, b, batches, kind):
    # triton's kernels also update strided parameters in place; the C++ ones refuse them
    strided = kind == "strided" and backend == "triton"
    params = [torch.nn.Parameter(layout(t.clone(), "strided" if strided else "contiguous")) for t in (w, b)]
    opt = make(params)
    for err, inp in batches:
        with torch.no_grad():
            ops.update(opt, [ops.LinearGrad(*params, layout(err, kind), layout(inp, kind))], backend=backend)
    return params, opt


def check(backend, make, w, b, batches, kind="contiguous"):
    """Parameters and state against torch.optim's in float64, in the parameters' dtype and in float32."""
    params, opt = fused_steps(make, backend, w, b, batches, kind)
    runs = [torch_steps(make, w, b, batches, d, f) for d, f in ((F64, F64), (w.dtype, batches[0][0].dtype), (F32, F32))]
    for i, (name, p) in enumerate(zip(("weight", "bias"), params)):
        assert_matches(p.detach(), *(r[0][i].detach() for r in runs), name)
        got, want = opt.state[p], runs[1][1].state[runs[1][0][i]]
        assert got.keys() == want.keys(), f"{name}: state keys {list(got)} != {list(want)}"
        for key, value in want.items():
            assert type(got[key]) is type(value), key
            if key == "step":
                assert torch.equal(got[key], value) and got[key].device == value.device, key
            else:
                assert_matches(got[key], *(r[1].state[r[0][i]][key] for r in runs), f"{name} {key}")


@per_backend("dtype,param_dtype,shape,kind,optimizer", matrix)
def test_matches_torch_optim(backend, dtype, param_dtype, shape, kind, optimizer):
    steps = 3 if backend in ("triton", "cuda") else 5
    w, b, batches = update_inputs(*shape, dtype, device(backend), param_dtype, steps=steps)
    check(backend, OPTIMIZERS[optimizer], w, b, batches, kind)


@backend_param(names=("cpp", "cuda"))
def test_tiles_a_weight_larger_than_the_workspace(backend):
    """A weight of more than 2^22 elements is updated in several row tiles."""
    w, b, batches = update_inputs(8, 1025, 4099, F32, device(backend), steps=2)
    check(backend, OPTIMIZERS["adamw-eps"], w, b, batches)


@backend_param(names=("cpp", "triton"))
def test_first_step_overwrites_a_poisoned_momentum_buffer(backend):
    w, _, [(err, inp)] = update_inputs(7, 37, 129, F64, device(backend), steps=1)
    want = w.clone()
    ref_opt = SGD([want], lr=0.1, momentum=0.9)
    want.grad = err.t() @ inp
    ref_opt.step()
    buf = torch.full_like(w, float("nan"))
    kernels(backend).sgd_update_(w, err, inp, buf, 0.1, 0.9, 0.0, 0.0, False, False, True)
    assert_matches(w, want, want, want.float(), "weight")
    assert_matches(buf, ref_opt.state[want]["momentum_buffer"], ref_opt.state[want]["momentum_buffer"],
                   ref_opt.state[want]["momentum_buffer"].float(), "momentum_buffer")


@backend_param(names=("triton",))
def test_momentum_needs_a_buffer(backend):
    with pytest.raises(ValueError, match="momentum_buffer"):
        kernels(backend).sgd_update_(torch.zeros(3), torch.ones(2, 3), None, None, 0.1, 0.9, 0.0, 0.0, False,
                                     False, True)


def assert_rel_close(got, want, rtol):
    """max |got - want| <= rtol * max |want| (elementwise relative error is meaningless
    where momentum or weight decay cancel to near zero)."""
    scale = want.detach().abs().max().item()
    assert (got.detach() - want.detach()).abs().max().item() <= rtol * max(scale, 1e-300)


def assert_same_state(opt, ref_opt, pairs, rtol):
    for p, q in pairs:
        assert_rel_close(p, q, rtol)
        got, want = opt.state.get(p, {}), ref_opt.state.get(q, {})
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert type(got[key]) is type(value), key
            if isinstance(value, torch.Tensor):
                assert (got[key].dtype, got[key].device) == (value.dtype, value.device), key
                assert_rel_close(got[key], value, rtol)


@per_backend("name", lambda b: ["momentum", "adamw"], names=("cpp", "triton"))
def test_switching_with_torch_optim_and_state_dict(backend, name):
    """Fused steps, then optimizer.step(), then a state_dict round trip, then fused again:
    the same trajectory as torch.optim alone."""
    make = OPTIMIZERS[name]
    w, b, batches = update_inputs(7, 37, 129, F64, device(backend), steps=6)
    w, b = w.requires_grad_(), b.requires_grad_()
    w2, b2 = (t.detach().clone().requires_grad_() for t in (w, b))
    opt, ref_opt = make([w, b]), make([w2, b2])
    for step, (err, inp) in enumerate(batches):
        if step == 4:
            fresh = make([w, b])
            fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
            opt = fresh
        with torch.no_grad():
            ops.update(opt, [ops.LinearGrad(w, b, err, inp)], backend="reference" if step in (2, 3) else backend)
            ops.update(ref_opt, [ops.LinearGrad(w2, b2, err, inp)], backend="reference")
    assert_same_state(opt, ref_opt, [(w, w2), (b, b2)], rtol=1e-12)


@per_backend("make", lambda b: [functools.partial(torch.optim.RMSprop, lr=0.01),
                                functools.partial(Adam, lr=0.01, amsgrad=True)], names=("cpp", "triton"))
def test_unsupported_optimizer_falls_back_with_one_warning(backend, make, monkeypatch):
    monkeypatch.setattr(fused_update, "_warned", set())
    w, b, batches = update_inputs(7, 37, 129, F64, device(backend))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, opt = fused_steps(make, backend, w, b, batches, "contiguous")
    messages = [str(w.message) for w in caught if "fused update" in str(w.message)]
    assert len(messages) == 1 and type(opt).__name__ in messages[0] and "materialised" in messages[0]
    ref_params, ref_opt = fused_steps(make, "reference", w, b, batches, "contiguous")
    assert_same_state(opt, ref_opt, list(zip(params, ref_params)), rtol=0)


#: per backend: dtype, layers (in, out, activation), batch, steps, the two optimizers, rtol and atol
TRAINING = {
    "cpp": (F64, [(9, 16, "relu"), (16, 12, "relu"), (12, 4, None)], 11, 20,
            [functools.partial(SGD, lr=0.05, momentum=0.9), functools.partial(AdamW, lr=0.003, weight_decay=0.01)],
            1e-10, 0),
    "triton": (F32, [(13, 33, "relu"), (33, 17, "tanh"), (17, 5, None)], 24, 3,
               [functools.partial(SGD, lr=0.05, momentum=0.9), functools.partial(AdamW, lr=0.01, weight_decay=0.01)],
               1e-5, 1e-6),
    "cuda": (F32, [(20, 64, "relu"), (64, 48, "gelu"), (48, 10, None)], 65, 10,
             [OPTIMIZERS["nesterov+wd"], OPTIMIZERS["adamw-eps"]], 1e-4, 1e-5),
}


@per_backend("which", lambda b: ["sgd", "adamw"], names=tuple(TRAINING))
def test_greedy_training_agrees_with_reference_backend(backend, which):
    dtype, layers, rows, steps, makes, rtol, atol = TRAINING[backend]
    dev, make, classes = device(backend), makes[which == "adamw"], layers[-1][1]
    nets = {}
    for name in ("reference", backend):
        torch.manual_seed(0)  # the same nodes and the same heads (built from the global generator)
        nodes = [lp.LocalLinear(i, o, activation=a, dtype=dtype, device=dev) for i, o, a in layers]
        nets[name] = lp.LocalSequential(*nodes, rule="greedy", num_classes=classes, optimizer=make, backend=name)
    gen = make_gen(2)
    for step in range(steps):
        x = torch.randn(rows, layers[0][0], generator=gen, dtype=dtype).to(dev)
        y = torch.randint(0, classes, (rows,), generator=gen).to(dev)
        losses = {name: net.train_step(x, y).losses for name, net in nets.items()}
        for node, loss in losses["reference"].items():
            assert losses[backend][node] == pytest.approx(loss, rel=max(rtol, 1e-12), abs=atol), f"step {step}"
    for p, q in zip(nets[backend].parameters(), nets["reference"].parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


@backend_param(names=("cpp",))
@pytest.mark.parametrize("with_inp", [True, False], ids=["weight", "bias"])
def test_rejects_bad_arguments(backend, with_inp):
    w, b, [(err, inp)] = update_inputs(7, 37, 129, F64, steps=1)
    with pytest.raises(RuntimeError, match=r"err must be \[B, 37\]"):
        torch.ops.localprop.sgd_update_(w if with_inp else b, err[:, :5], inp if with_inp else None, None,
                                        0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="step is the count after this update"):
        torch.ops.localprop.adam_update_(w, err, inp, torch.zeros_like(w), torch.zeros_like(w),
                                         0.1, 0.9, 0.999, 1e-8, 0.0, False, False, 0)


def samples(backend, with_inp):
    """(sgd_update_, its args), (adam_update_, its args) of ``backend`` for a weight or a bias."""
    kernels(backend)  # registers the triton ops
    suffix = "triton" if backend == "triton" else ""
    w, b, [(err, inp)] = update_inputs(7, 37, 13, F64 if backend == "cpp" else F32, device(backend), steps=1)
    p, inp = (w, inp) if with_inp else (b, None)
    sgd = (p.clone(), err, inp, torch.randn_like(p), 0.1, 0.9, 0.1, 0.01, False, False, False)
    adam = (p.clone(), err, inp, torch.randn_like(p), torch.rand_like(p), 0.01, 0.9, 0.999, 1e-8, 0.01, True, False, 3)
    L = torch.ops.localprop
    return (getattr(L, "sgd_update_" + suffix).default, sgd), (getattr(L, "adam_update_" + suffix).default, adam)


@per_backend("with_inp", lambda b: [True, False], names=("cpp", "triton", "cuda"))
def test_opcheck(backend, with_inp):
    for op, args in samples(backend, with_inp):
        torch.library.opcheck(op, args, **opcheck_utils(backend))


@per_backend("with_inp", lambda b: [True, False], names=("cpp", "cuda"))
def test_compiles_fullgraph(backend, with_inp):
    eager = samples(backend, with_inp)
    traced = [(op, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)) for op, args in eager]

    def step(*calls):
        for op, args in calls:
            op(*args)

    step(*eager)
    torch._dynamo.reset()
    torch.compile(step, fullgraph=True)(*traced)
    for (_, args), (_, compiled) in zip(eager, traced):
        for a, b in zip(args, compiled):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
