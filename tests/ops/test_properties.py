"""Property-based tests (hypothesis) of every fused op against its PyTorch reference, on
cpp and triton (on CUDA where present, else under its interpreter; either way with smaller
shapes and fewer examples, as the interpreter runs each kernel in Python). Examples are
drawn on the CPU, moved to the backend's device, and its results are compared on the CPU.

Each example draws a shape, a dtype, memory layouts and values in one of three regimes:
"finite" (magnitudes from 1e-30 to 1e30, exact zeros, denormals, logits up to ~1e30 for
softmax stability), "overflow" (non-negative factors whose every product exceeds the
dtype's range, so each sum is +inf whatever the order or width of its accumulation) and
"nonfinite" (a few NaN and ±inf entries in the input). The properties:

- where PyTorch's reference in the kernel's dtype is finite, the kernel is finite and its
  max error against the float64 reference is at most twice PyTorch's own (see
  :func:`assert_matches`);
- where that reference has NaN or inf, the kernel has them at exactly the same elements.

Examples are derandomized, so a CI failure reproduces anywhere.
"""
import copy
import functools

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from localprop import ops
from localprop.ops.activation import pack_mask
from tests.ops import cases
from tests.ops.cases import ACTIVATIONS, LAYOUTS, backend_param, layout, per_backend, references

#: the backends under test (cuda has no properties yet); absent ones are skipped
BACKENDS = ("cpp", "triton")
DTYPES = (torch.float32, torch.float64)

#: per backend: examples per test case (each activation and regime is its own case, so
#: that every combination is drawn), and the largest batch, features and classes drawn;
#: with these the file runs in well under a minute on two cores
EXAMPLES = {"cpp": 15, "triton": 3}
LIMITS = {"cpp": (64, 70, 12), "triton": (8, 12, 5)}

#: decimal exponents of the input scales: within it no computation of the references
#: overflows in float32 (|z| <= 1e30 * ~5 * ~5 * 70)
SAFE_EXP = 30
#: the overflow regime: two factors at this scale multiply past the dtype's max for any
#: normal draw (float32: 1e60 > 3e38; float64: 1e400 > 1.8e308)
OVERFLOW = {torch.float32: 1e30, torch.float64: 1e200}
REGIMES = ("finite", "overflow", "nonfinite")

#: (activation, regime) of every transform case
TRANSFORM_CASES = [(a, r) for a in ACTIVATIONS for r in REGIMES]
#: (backend, activation, regime) of every head_error case
HEAD_ERROR_CASES = [(a, r) for a in ACTIVATIONS for r in REGIMES]


def run_property(backend, strategy, check, examples=1):
    """Run ``check(case)`` on ``examples`` x EXAMPLES[backend] of ``strategy``'s examples
    (the count depends on the backend, so the hypothesis test is built here, not decorated)."""
    # no shrinking under the Triton interpreter: it would take most of the file's time
    phases = [p for p in Phase if backend != "triton" or p is not Phase.shrink]
    @settings(max_examples=examples * EXAMPLES[backend], deadline=None, derandomize=True, database=None,
              phases=phases)
    @given(strategy)
    def prop(case):
        check(backend, case)

    prop()


# --- values -----------------------------------------------------------------------------

@st.composite
def tensors(draw, shape, dtype, exps=st.integers(-SAFE_EXP, SAFE_EXP), divisor=1.0):
    """A float64 tensor of ``shape`` that is exactly representable in ``dtype``: normal
    values scaled by 10**exp, with some entries (or all) exactly zero or denormal."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * (10.0 ** draw(exps) / divisor)
    special = draw(st.sampled_from(("none", "zeros", "denormals", "all_zero")))
    some = torch.rand(shape, generator=gen, dtype=torch.float64) < 0.3
    if special == "zeros":
        t[some] = 0
    elif special == "denormals":
        # below dtype's smallest normal: gradual underflow must not turn into NaN or garbage
        tiny = torch.finfo(dtype).tiny
        t[some] = (torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5)[some] * tiny
    elif special == "all_zero":
        t.zero_()
    return t.to(dtype).double()


def overflowing(t, dtype):
    """|t| at the overflow scale. Non-negative, so that products overflow to +inf only: a
    sum of +inf and -inf would be NaN or ±inf depending on how wide its accumulator is."""
    return t.abs() * OVERFLOW[dtype]


@st.composite
def with_nonfinite(draw, t):
    """t with one to three entries set to NaN, inf or -inf."""
    t = t.clone()
    for _ in range(draw(st.integers(1, 3))):
        index = tuple(draw(st.integers(0, size - 1)) for size in t.shape)
        t[index] = draw(st.sampled_from((float("nan"), float("inf"), float("-inf"))))
    return t


def scales(regime, finite=st.integers(-SAFE_EXP, SAFE_EXP)):
    """Decimal exponents of an input's scale in ``regime`` (overflow scales separately)."""
    return st.just(0) if regime == "overflow" else finite


def cast(args, dtype):
    """Floating tensors of ``args`` in ``dtype``; labels, masks and None unchanged."""
    return [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def on(backend, args):
    """Tensors of ``args`` moved to the device ``backend`` runs on (None unchanged)."""
    dev = cases.device(backend)
    return [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]


def relayout(args, kinds):
    """The first len(kinds) of ``args`` in those layouts (1-D, integer and the rest as they are)."""
    kinds = list(kinds) + ["contiguous"] * (len(args) - len(kinds))
    return [layout(a, k) if isinstance(a, torch.Tensor) and a.dim() == 2 and a.is_floating_point() else a
            for a, k in zip(args, kinds)]


# --- tolerance --------------------------------------------------------------------------

def assert_matches(out, ref64, ref_same, ref32, what, regime="finite"):
    """tests.ops.cases.assert_matches with its float32 floor of 4 ulps in every dtype: the
    drawn sizes stay small (K <= 70), where float64 kernels need no wider floor."""
    cases.assert_matches(out, ref64, ref_same, ref32, what, regime, ulps=4)


# --- transform --------------------------------------------------------------------------

@st.composite
def transform_cases(draw, backend, activation, regime):
    max_b, max_k, _ = LIMITS[backend]
    rows, k, n = draw(st.integers(1, max_b)), draw(st.integers(1, max_k)), draw(st.integers(1, max_k))
    dtype = draw(st.sampled_from(DTYPES))
    u = draw(tensors((rows, k), dtype, scales(regime)))
    w = draw(tensors((n, k), dtype, st.just(0), divisor=k ** 0.5))
    if regime == "overflow":
        u, w = overflowing(u, dtype), overflowing(w, dtype)
    elif regime == "nonfinite":
        u = draw(with_nonfinite(u))
    b = draw(st.none() | tensors((n,), dtype))
    return dict(u=u, w=w, b=b, dtype=dtype, regime=regime, activation=activation,
                layouts=draw(st.tuples(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS))))


def check_transform(backend, case):
    dtype, activation = case["dtype"], case["activation"]
    args = [case["u"], case["w"], case["b"]]
    h, aux = ops.transform(*relayout(on(backend, cast(args, dtype)), case["layouts"]), activation, backend=backend)
    h, aux = h.cpu(), aux.cpu()
    (h64, aux64), (h_same, aux_same), (h32, aux32) = references(
        lambda *a: ops.transform_ref(*a, activation), args, dtype)
    assert_matches(h, h64, h_same, h32, "h", case["regime"])
    if activation == "relu":  # the mask must say exactly where the kernel's own h is positive
        assert torch.equal(aux, pack_mask(h > 0)), "mask bits"
    elif activation == "gelu":
        assert_matches(aux, aux64, aux_same, aux32, "z", case["regime"])
    else:
        assert aux.numel() == 0


@pytest.mark.parametrize("activation,regime", TRANSFORM_CASES)
@backend_param(names=BACKENDS)
def test_transform(backend, activation, regime):
    run_property(backend, transform_cases(backend, activation, regime), check_transform)


# --- head and error ---------------------------------------------------------------------

@st.composite
def head_error_cases(draw, backend, activation, regime):
    """h and aux from the float64 reference transform of drawn inputs; the head (A, c)
    or none (h is then the logits); labels; and the message weight W or none."""
    max_b, max_k, max_c = LIMITS[backend]
    rows, k = draw(st.integers(1, max_b)), draw(st.integers(1, max_k))
    classes = draw(st.integers(2, max_c))
    with_head = draw(st.booleans())
    n = draw(st.integers(1, max_k)) if with_head else classes
    dtype = draw(st.sampled_from(DTYPES))
    u = draw(tensors((rows, k), dtype, scales(regime)))
    w_in = draw(tensors((n, k), dtype, st.just(0), divisor=k ** 0.5))
    a = draw(tensors((classes, n), dtype, st.just(0), divisor=n ** 0.5)) if with_head else None
    if regime == "overflow":  # the logits overflow: the head's product, or h itself without a head
        u = overflowing(u, dtype)
        a, w_in = (overflowing(a, dtype), w_in.abs()) if with_head else (a, overflowing(w_in, dtype))
    elif regime == "nonfinite":
        u = draw(with_nonfinite(u))
    h, aux = ops.transform_ref(u, w_in, None, activation)
    c = draw(st.none() | tensors((classes,), dtype, st.integers(-4, 4))) if with_head else None
    w = draw(st.none() | tensors((n, draw(st.integers(1, max_k))), dtype, st.integers(-SAFE_EXP, SAFE_EXP)))
    y = torch.tensor(draw(st.lists(st.integers(0, classes - 1), min_size=rows, max_size=rows)))
    return dict(args=[h.to(dtype), aux.to(dtype) if aux.is_floating_point() else aux, a, c, y, w],
                dtype=dtype, regime=regime, activation=activation,
                layouts=draw(st.tuples(*[st.sampled_from(LAYOUTS)] * 6)))


def check_head_error(backend, case):
    dtype, activation = case["dtype"], case["activation"]
    h, aux, a, c, y, w = case["args"]
    inputs = relayout(on(backend, cast(case["args"], dtype)), case["layouts"])
    out = ops.head_error(*inputs[:5], activation, inputs[5], backend=backend)
    out = type(out)(*(None if t is None else t.cpu() for t in out))
    ref64, same, ref32 = references(
        lambda h_, aux_, a_, c_, w_: ops.head_error_ref(h_, aux_, a_, c_, y, activation, w_),
        [h, aux, a, c, w], dtype)
    for name in ("loss", "dlogits", "err", "message"):
        if getattr(same, name) is None:
            assert getattr(out, name) is None, name
        else:
            assert_matches(getattr(out, name), getattr(ref64, name), getattr(same, name), getattr(ref32, name),
                           name, case["regime"])


@per_backend("activation,regime", lambda b: HEAD_ERROR_CASES, names=BACKENDS)
def test_head_error(backend, activation, regime):
    run_property(backend, head_error_cases(backend, activation, regime), check_head_error)


# --- update -----------------------------------------------------------------------------

def optimizers():
    """torch.optim factories over the hyperparameters the fused update implements."""
    sgd = st.builds(
        lambda lr, momentum, dampening, nesterov, wd, maximize: functools.partial(
            torch.optim.SGD, lr=lr, momentum=momentum, dampening=0.0 if nesterov else dampening,
            nesterov=nesterov and momentum > 0, weight_decay=wd, maximize=maximize),
        st.sampled_from((1e-3, 0.1, 1.0)), st.sampled_from((0.0, 0.5, 0.9)), st.sampled_from((0.0, 0.3)),
        st.booleans(), st.sampled_from((0.0, 0.01)), st.booleans())
    adam = st.builds(
        lambda cls, lr, betas, eps, wd, maximize: functools.partial(
            cls, lr=lr, betas=betas, eps=eps, weight_decay=wd, maximize=maximize),
        st.sampled_from((torch.optim.Adam, torch.optim.AdamW)), st.sampled_from((1e-3, 0.1)),
        st.sampled_from(((0.9, 0.999), (0.3, 0.9), (0.0, 0.5))), st.sampled_from((1e-8, 1e-3)),
        st.sampled_from((0.0, 0.01)), st.booleans())
    return sgd | adam


@st.composite
def update_cases(draw, backend, regime):
    """Parameters, an optimizer and 1 to 3 steps of gradient factors (err, inp). The
    gradient's scale stays below 1e15 in the finite regime, as Adam squares it."""
    max_b, max_k, _ = LIMITS[backend]
    rows, n, k = draw(st.integers(1, max_b)), draw(st.integers(1, max_k)), draw(st.integers(1, max_k))
    dtype = draw(st.sampled_from(DTYPES))
    w = draw(tensors((n, k), dtype, st.integers(-10, 10)))
    b = draw(st.none() | tensors((n,), dtype, st.integers(-10, 10)))
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        err = draw(tensors((rows, n), dtype, scales(regime, st.integers(-SAFE_EXP, 0))))
        inp = draw(tensors((rows, k), dtype, scales(regime, st.integers(-SAFE_EXP, 15))))
        if regime == "overflow":
            err, inp = overflowing(err, dtype), overflowing(inp, dtype)
        elif regime == "nonfinite":
            err = draw(with_nonfinite(err))
        steps.append((err, inp, draw(st.tuples(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS)))))
    return dict(w=w, b=b, dtype=dtype, regime=regime, make=draw(optimizers()), steps=steps)


def train(make, case, dtype, backend, layouts=True):
    """(params, optimizer) after the case's steps on copies of its parameters in dtype.
    ``backend`` "reference" is update_ref on a deep copy of a fresh (params, optimizer)."""
    dev = cases.device(backend)
    params = [t.to(dev, dtype, copy=True).requires_grad_() for t in (case["w"], case["b"]) if t is not None]
    params, opt = copy.deepcopy((params, make(params)))
    w, b = params[0], params[1] if len(params) > 1 else None
    for err, inp, kinds in case["steps"]:
        err, inp = on(backend, cast((err, inp), dtype))
        if layouts:
            err, inp = layout(err, kinds[0]), layout(inp, kinds[1])
        with torch.no_grad():
            ops.update(opt, [ops.LinearGrad(w, b, err, inp)], backend=backend)
    return params, opt


def check_update(backend, case):
    dtype, make = case["dtype"], case["make"]
    params, opt = train(make, case, dtype, backend)
    runs = [train(make, case, d, "reference", layouts=False) for d in (torch.float64, dtype, torch.float32)]
    for i, p in enumerate(params):
        assert_matches(p.detach().cpu(), *(r[0][i].detach() for r in runs), f"param {i}", case["regime"])
        want = runs[1][1].state[runs[1][0][i]]
        got = opt.state[p]
        assert got.keys() == want.keys(), f"param {i}: state keys {list(got)} != {list(want)}"
        for key, value in want.items():
            if key == "step":
                assert torch.equal(got[key].cpu(), value)
            else:
                assert_matches(got[key].cpu(), *(r[1].state[r[0][i]][key] for r in runs), f"param {i} {key}",
                               case["regime"])


@pytest.mark.parametrize("regime", REGIMES)
@backend_param(names=BACKENDS)
def test_update(backend, regime):
    run_property(backend, update_cases(backend, regime), check_update, examples=3)


# The two bugs these properties found, kept as plain regression tests.
@backend_param(names=BACKENDS)
def test_relu_keeps_nan_as_torch_does(backend):
    """A NaN pre-activation must stay NaN (a max-like ReLU turned it into 0 and hid it)."""
    u, w = on(backend, [torch.tensor([[float("nan")], [-1.0], [2.0]]), torch.ones(1, 1)])
    h, aux = ops.transform(u, w, None, "relu", backend)
    assert h[0, 0].isnan() and h[1, 0] == 0 and h[2, 0] == 2
    assert torch.equal(aux.cpu(), pack_mask(torch.tensor([[False], [False], [True]])))


@backend_param(names=BACKENDS)
def test_confident_cross_entropy_keeps_its_precision(backend):
    """loss = (max - logit_y) + log Σ exp(logits - max): adding log Σ to the max first
    rounded a 1.1e-7 loss to 0 in float32."""
    logits, y = torch.tensor([[16.0, 0.0]]), torch.tensor([0])
    on_dev = on(backend, [logits, y])
    out = ops.head_error(on_dev[0], on_dev[0].new_empty(0), None, None, on_dev[1], None, backend=backend)
    exact = float(torch.nn.functional.cross_entropy(logits.double(), y))
    torch_error = abs(float(torch.nn.functional.cross_entropy(logits, y)) - exact)
    assert abs(float(out.loss) - exact) <= 2 * torch_error + 1e-12
