"""The fused update (SGD, Adam, AdamW from the gradient's factors) against torch.optim
itself: parameters and optimizer state, over several steps, in float64 and float32."""
import copy
import functools
import warnings

import pytest
import torch

import localprop as lp
from localprop import ops
from localprop.ops import fused_update
from tests.conftest import mlp_nodes
from tests.ops.conftest import LARGE_SIZE, ODD_SIZES, assert_close_to_ref, kernel_backend, layout, make_gen

SGD, Adam, AdamW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW
OPTIMIZERS = {
    "sgd": functools.partial(SGD, lr=0.1),
    "momentum": functools.partial(SGD, lr=0.1, momentum=0.9),
    "nesterov": functools.partial(SGD, lr=0.1, momentum=0.9, nesterov=True),
    "dampening+wd": functools.partial(SGD, lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.01),
    "maximize+tensor_lr": functools.partial(SGD, lr=torch.tensor(0.05), momentum=0.5, weight_decay=0.1,
                                            maximize=True),
    "adam": functools.partial(Adam, lr=0.01),
    "adam+wd+maximize": functools.partial(Adam, lr=0.01, betas=(0.3, 0.99), weight_decay=0.05, maximize=True),
    "adamw": functools.partial(AdamW, lr=0.01, weight_decay=0.1),
}
#: (B, N, K): the weight spans several row tiles at K = 200 and K = LARGE_SIZE
SHAPES = [(1, 1, 1), (7, 37, 129), (ODD_SIZES[2], 129, 200), (5, 129, LARGE_SIZE)]


def params(n, k, dtype, seed=0):
    gen = make_gen(seed)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return w, b


def factors(rows, n, k, dtype, gen):
    err = torch.randn(rows, n, generator=gen, dtype=torch.float64).to(dtype)
    return err, torch.randn(rows, k, generator=gen, dtype=torch.float64).to(dtype)


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


def assert_rel_close(got, want, rtol):
    """max |got - want| <= rtol * max |want| (elementwise relative error is meaningless
    where momentum or weight decay cancel to near zero)."""
    scale = want.detach().abs().max().item()
    assert (got.detach() - want.detach()).abs().max().item() <= rtol * max(scale, 1e-300)


def run(make, backend, shape, dtype, steps, layout_kind="contiguous"):
    """(fused params, optimizer), (torch.optim params, optimizer) after ``steps`` steps."""
    rows, n, k = shape
    w, b = params(n, k, dtype)
    w2, b2 = (t.detach().clone().requires_grad_() for t in (w, b))
    opt, ref_opt = make([w, b]), make([w2, b2])
    gen = make_gen(1)
    for _ in range(steps):
        err, inp = factors(rows, n, k, dtype, gen)
        with torch.no_grad():
            ops.update(opt, [ops.LinearGrad(w, b, layout(err, layout_kind), layout(inp, layout_kind))],
                       backend=backend)
            ops.update(ref_opt, [ops.LinearGrad(w2, b2, err, inp)], backend="reference")
    return opt, ref_opt, [(w, w2), (b, b2)]


@kernel_backend
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_float64_matches_torch_optim(backend, name, shape):
    opt, ref_opt, pairs = run(OPTIMIZERS[name], backend, shape, torch.float64, steps=5)
    assert_same_state(opt, ref_opt, pairs, rtol=1e-12)


@kernel_backend
@pytest.mark.parametrize("kind", ["strided", "transposed"])
def test_non_contiguous_factors(backend, kind):
    opt, ref_opt, pairs = run(OPTIMIZERS["momentum"], backend, (7, 37, 129), torch.float64, 3, kind)
    assert_same_state(opt, ref_opt, pairs, rtol=1e-12)


@kernel_backend
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_float32_one_step_within_twice_torch_error(backend, name):
    """One float32 step against the step torch.optim takes in float64 on the same values."""
    results = {}
    for which, dtype in (("kernel", torch.float32), ("torch32", torch.float32), ("torch64", torch.float64)):
        w, b = params(129, 200, torch.float32)
        w, b = (t.detach().to(dtype).requires_grad_() for t in (w, b))
        err, inp = (t.to(dtype) for t in factors(37, 129, 200, torch.float32, make_gen(1)))
        with torch.no_grad():
            ops.update(OPTIMIZERS[name]([w, b]), [ops.LinearGrad(w, b, err, inp)],
                       backend=backend if which == "kernel" else "reference")
        results[which] = (w.detach(), b.detach())
    for got, want32, want64 in zip(results["kernel"], results["torch32"], results["torch64"]):
        assert_close_to_ref(got, want64, want32)


@kernel_backend
def test_first_step_overwrites_a_poisoned_momentum_buffer(backend):
    w, _ = params(37, 129, torch.float64)
    err, inp = factors(7, 37, 129, torch.float64, make_gen(1))
    want = w.detach().clone()
    ref_opt = SGD([want], lr=0.1, momentum=0.9)
    want.grad = err.t() @ inp
    ref_opt.step()
    buf = torch.full_like(w, float("nan"))
    with torch.no_grad():
        torch.ops.localprop.sgd_update_(w, err, inp, buf, 0.1, 0.9, 0.0, 0.0, False, False, True)
    assert_rel_close(w, want, 1e-12)
    assert_rel_close(buf, ref_opt.state[want]["momentum_buffer"], 1e-12)


@kernel_backend
@pytest.mark.parametrize("name", ["momentum", "adamw"])
def test_switching_with_torch_optim_and_state_dict(backend, name):
    """Fused steps, then optimizer.step(), then a state_dict round trip, then fused again:
    the same trajectory as torch.optim alone."""
    make = OPTIMIZERS[name]
    w, b = params(37, 129, torch.float64)
    w2, b2 = (t.detach().clone().requires_grad_() for t in (w, b))
    opt, ref_opt = make([w, b]), make([w2, b2])
    gen = make_gen(1)
    for step in range(6):
        if step == 4:
            fresh = make([w, b])
            fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
            opt = fresh
        err, inp = factors(7, 37, 129, torch.float64, gen)
        with torch.no_grad():
            ops.update(opt, [ops.LinearGrad(w, b, err, inp)], backend="reference" if step in (2, 3) else backend)
            ops.update(ref_opt, [ops.LinearGrad(w2, b2, err, inp)], backend="reference")
    assert_same_state(opt, ref_opt, [(w, w2), (b, b2)], rtol=1e-12)


@kernel_backend
@pytest.mark.parametrize("make", [functools.partial(torch.optim.RMSprop, lr=0.01),
                                  functools.partial(Adam, lr=0.01, amsgrad=True)], ids=["rmsprop", "amsgrad"])
def test_unsupported_optimizer_falls_back_with_one_warning(backend, make, monkeypatch):
    monkeypatch.setattr(fused_update, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt, ref_opt, pairs = run(make, backend, (7, 37, 129), torch.float64, steps=3)
    messages = [str(w.message) for w in caught if "fused update" in str(w.message)]
    assert len(messages) == 1 and type(opt).__name__ in messages[0] and "materialised" in messages[0]
    assert_same_state(opt, ref_opt, pairs, rtol=0)


@kernel_backend
@pytest.mark.parametrize("make", [functools.partial(SGD, lr=0.05, momentum=0.9),
                                  functools.partial(AdamW, lr=0.003, weight_decay=0.01)], ids=["sgd", "adamw"])
def test_greedy_training_agrees_with_reference_backend(backend, make):
    nets = {}
    for name in ("reference", backend):
        torch.manual_seed(0)  # the same nodes and the same heads (built from the global generator)
        nets[name] = lp.LocalSequential(*mlp_nodes([9, 16, 12, 4], torch.float64), rule="greedy", num_classes=4,
                                        optimizer=make, backend=name)
    gen = make_gen(2)
    for _ in range(20):
        x, y = torch.randn(11, 9, generator=gen, dtype=torch.float64), torch.randint(0, 4, (11,), generator=gen)
        for net in nets.values():
            net.train_step(x, y)
    for p, q in zip(nets[backend].parameters(), nets["reference"].parameters()):
        assert_rel_close(p, q, 1e-10)


@kernel_backend
@pytest.mark.parametrize("with_inp", [True, False], ids=["weight", "bias"])
def test_rejects_bad_arguments(backend, with_inp):
    w, b = params(37, 129, torch.float64)
    err, inp = factors(7, 37, 129, torch.float64, make_gen(1))
    with pytest.raises(RuntimeError, match=r"err must be \[B, 37\]"):
        torch.ops.localprop.sgd_update_(w if with_inp else b, err[:, :5], inp if with_inp else None, None,
                                        0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="step is the count after this update"):
        torch.ops.localprop.adam_update_(w, err, inp, torch.zeros_like(w), torch.zeros_like(w),
                                         0.1, 0.9, 0.999, 1e-8, 0.0, False, False, 0)


def sgd_args(with_inp):
    w, b = params(37, 13, torch.float64)
    err, inp = factors(7, 37, 13, torch.float64, make_gen(1))
    p = (w if with_inp else b).detach()
    return (p, err, inp if with_inp else None, torch.randn_like(p), 0.1, 0.9, 0.1, 0.01, False, False, False)


def adam_args(with_inp):
    p, err, inp, _, *rest = sgd_args(with_inp)
    return (p, err, inp, torch.randn_like(p), torch.rand_like(p), 0.01, 0.9, 0.999, 1e-8, 0.01, True, False, 3)


@kernel_backend
@pytest.mark.parametrize("with_inp", [True, False], ids=["weight", "bias"])
def test_opcheck(backend, with_inp):
    torch.library.opcheck(torch.ops.localprop.sgd_update_.default, sgd_args(with_inp))
    torch.library.opcheck(torch.ops.localprop.adam_update_.default, adam_args(with_inp))


@kernel_backend
def test_compiles_fullgraph(backend):
    def step(sgd, adam):
        torch.ops.localprop.sgd_update_(*sgd)
        torch.ops.localprop.adam_update_(*adam)

    eager = (sgd_args(True), adam_args(False))
    traced = [tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args) for args in eager]
    step(*eager)
    torch.compile(step, fullgraph=True)(*traced)
    for args, compiled in zip(eager, traced):
        for a, b in zip(args, compiled):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
