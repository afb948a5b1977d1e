"""What every op test shares, for every backend: which backends to test and on which
device, dtypes, odd sizes, non-contiguous layouts, input factories, output poisoning and
the one tolerance ("a kernel's error against the float64 reference is at most twice
PyTorch's own error in the same dtype").

It lives in tests/ (not localprop/) so that it ships with the tests, including the copy
`make asan` runs, and not in the wheel; bench/ imports it as ``tests.ops.cases`` when run
from the repository root (``python -m pytest bench``). It imports neither triton nor
localprop.kernels: a triton backend is imported only by the test that runs it.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from localprop.ops import backends

CPU = torch.device("cpu")
#: every backend, each tested on the device it runs on (triton: CUDA if present, else the CPU
#: under Triton's interpreter, which tests/conftest.py selects before triton is imported)
NAMES = ("reference", "cpp", "triton", "cuda")

#: the op tests' shapes are deliberately odd (1, 7, 37, 129: below and above a vector
#: width, above a tile) and one in each op is about this large
LARGE_SIZE = 1000
ACTIVATIONS = (None, "relu", "tanh", "sigmoid", "gelu")
LAYOUTS = ("contiguous", "strided", "transposed")
F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16


def device(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return CPU


def interpreted(backend: str) -> bool:
    """True for triton under its interpreter: small shapes only (it runs kernels in Python)."""
    return backend == "triton" and device(backend).type == "cpu"


def small(backend: str) -> bool:
    """Whether ``backend`` takes only the small shapes: under Triton's interpreter, and the
    reference (there the test checks the oracle against itself: a test of the harness)."""
    return backend == "reference" or interpreted(backend)


def why_absent(backend: str) -> str | None:
    dev = device(backend)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA device"
    return backends.why_unavailable(backend, dev)


def dtypes(backend: str) -> tuple[torch.dtype, ...]:
    """The dtypes every case of ``backend`` runs in (the interpreter has no bfloat16; the
    CUDA extension has no float64 kernels)."""
    return (F32, BF16) if backend == "cuda" else (F64, F32)


def marks(backend: str) -> list:
    """gpu for every case that runs on a CUDA device (cuda, and triton where CUDA is present);
    a skip with the reason when the backend is absent."""
    reason = why_absent(backend)
    gpu = [pytest.mark.gpu] if device(backend).type == "cuda" else []
    return gpu + ([pytest.mark.skip(reason=reason)] if reason else [])


def _id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__
    return str(value)


def per_backend(argnames: str, values, names=NAMES):
    """Parametrize over "backend," + ``argnames`` with the tuples ``values(backend)``
    yields for each backend; an absent backend's cases are skipped with the reason, and
    the cuda ones are marked gpu."""
    params = []
    for name in names:
        for v in values(name):
            v = tuple(v) if "," in argnames else (v,)
            params.append(pytest.param(name, *v, marks=marks(name), id="-".join([name, *map(_id, v)])))
    return pytest.mark.parametrize("backend," + argnames, params)


def backend_param(fn=None, names=NAMES):
    """Parametrize a test over ``backend`` alone."""
    deco = pytest.mark.parametrize("backend", [pytest.param(n, marks=marks(n), id=n) for n in names])
    return deco(fn) if fn is not None else deco


# --- inputs -----------------------------------------------------------------------------

def make_gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=F64, gen, device=CPU, scale=1.0) -> torch.Tensor:
    """Normal values drawn in float64 on the CPU (the same on every device), scaled, cast, moved."""
    return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype).to(device)


def layout(t: torch.Tensor | None, kind: str) -> torch.Tensor | None:
    """``t`` with the same values in another memory layout: "strided" is every other
    element along the last dim of a wider tensor whose gaps hold NaN (integers: their
    maximum), so a kernel ignoring strides reads garbage; "transposed" a column-major copy
    (2-D only)."""
    if t is None or kind == "contiguous":
        return t
    if kind == "strided":
        fill = float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).max
        wide = t.new_full((*t.shape[:-1], 2 * t.shape[-1]), fill)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.t().contiguous().t() if t.dim() == 2 else t


def cast(t, dtype):
    """A floating tensor in ``dtype``; None, labels and masks unchanged."""
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def transform_inputs(rows, k, n, dtype, dev=CPU, param_dtype=None, bias=True, seed=0):
    """(u [B, K], W [N, K], b [N] or None), the parameters in ``param_dtype`` (default dtype)."""
    gen, pd = make_gen(seed), param_dtype or dtype
    u = randn(rows, k, dtype=dtype, gen=gen, device=dev)
    w = randn(n, k, dtype=pd, gen=gen, device=dev, scale=k ** -0.5)
    b = randn(n, dtype=pd, gen=gen, device=dev)
    return u, w, b if bias else None


def head_inputs(rows, n, classes, head_bias, k, dtype, activation, dev=CPU, param_dtype=None, seed=0):
    """(h, aux, A, c, y, W) as a node's transform leaves them (from a float64 z); no head
    (A = c = None, the logits are h) when ``classes`` is None, no message (W = None) when
    ``k`` is None."""
    gen, pd = make_gen(seed), param_dtype or dtype
    from localprop.ops import activation as act
    z = randn(rows, n, gen=gen, device=dev)
    h, aux = act.apply(z, activation).to(dtype), act.keep_for_grad(z, activation)
    aux = aux.to(dtype) if aux.is_floating_point() else aux
    a = None if classes is None else randn(classes, n, dtype=pd, gen=gen, device=dev, scale=n ** -0.5)
    c = randn(classes, dtype=pd, gen=gen, device=dev) if classes is not None and head_bias else None
    y = torch.randint(0, n if classes is None else classes, (rows,), generator=gen).to(dev)
    w = None if k is None else randn(n, k, dtype=pd, gen=gen, device=dev, scale=k ** -0.5)
    return h, aux, a, c, y, w


def update_inputs(rows, n, k, dtype, dev=CPU, param_dtype=None, steps=3, seed=0):
    """(W [N, K], b [N]) in ``param_dtype`` and ``steps`` gradient factors (err [B, N], inp [B, K])."""
    gen = make_gen(seed)
    w = randn(n, k, dtype=param_dtype or dtype, gen=gen, device=dev)
    b = randn(n, dtype=param_dtype or dtype, gen=gen, device=dev)
    batches = [(randn(rows, n, dtype=dtype, gen=gen, device=dev),
                randn(rows, k, dtype=dtype, gen=gen, device=dev)) for _ in range(steps)]
    return w, b, batches


# --- poisoning --------------------------------------------------------------------------

@contextlib.contextmanager
def poisoned():
    """Every tensor torch.empty makes (on any device, from Python, C++ or a Triton
    wrapper) starts as NaN (integers: their maximum), so an output element an op never
    writes shows up in the comparisons. Nondeterministic ops only warn meanwhile."""
    old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        torch.utils.deterministic.fill_uninitialized_memory = old[2]


# --- tolerance --------------------------------------------------------------------------

def assert_matches(out, ref64, ref_same, ref32=None, what="", regime="finite", ulps=None):
    """``out``: the kernel's result in dtype D; ``ref64``: the float64 reference;
    ``ref_same``: PyTorch's reference in D; ``ref32``: in float32 (needed for D = float64).

    out is non-finite exactly where ref_same is. Then, in the "finite" ``regime`` (in the
    others only that pattern is checked): max |out - ref64| <= 2 x PyTorch's own max error
    in D plus ``ulps`` of D at the output's scale (the final rounding, which PyTorch may
    happen to avoid; by default 4, and 64 for float64, where a kernel's summation order
    differs from BLAS's by more than the final rounding). PyTorch's error in float64
    cannot be measured against a float64 truth, so there it is its float32 error scaled
    by the ratio of the two dtypes' eps (as flash-attention's tests do)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == ref_same.dtype and out.device == ref_same.device, f"{what}: {out.dtype} on {out.device}"
    got, want = torch.isfinite(out), torch.isfinite(ref_same)
    assert torch.equal(got, want), (f"{what}: non-finite at {(~got).nonzero().tolist()[:6]}, the reference at "
                                    f"{(~want).nonzero().tolist()[:6]}")
    if regime != "finite" or out.numel() == 0:
        return
    eps = torch.finfo(out.dtype).eps
    ulps = ulps if ulps is not None else 64 if out.dtype == F64 else 4
    ref64 = ref64.double()
    lower = ref32 if out.dtype == F64 else ref_same
    assert lower is not None, f"{what}: a float64 output needs PyTorch's float32 result"
    torch_err = (lower.double() - ref64).abs().max().item() * eps / torch.finfo(lower.dtype).eps
    scale = max(ref64.abs().max().item(), torch.finfo(out.dtype).tiny)
    err = (out.double() - ref64).abs().max().item()
    tol = 2 * torch_err + ulps * eps * scale
    assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g} (PyTorch's own {torch_err:.3g}, scale {scale:.3g})"


def references(fn, args, dtype):
    """fn(*args) with the floating args in float64, in ``dtype`` and in float32."""
    return tuple(fn(*(cast(a, d) for a in args)) for d in (F64, dtype, F32))


def kernels(backend: str):
    """The namespace holding the backend's raw ops (transform, head_error, sgd_update_,
    adam_update_): torch.ops.localprop for cpp and cuda, localprop.kernels for triton."""
    if backend == "triton":
        import types

        from localprop.kernels import head_error, transform, update
        return types.SimpleNamespace(transform=transform.transform, head_error=head_error.head_error,
                                     sgd_update_=update.sgd_update_, adam_update_=update.adam_update_)
    return torch.ops.localprop


def opcheck_utils(backend: str) -> dict:
    """opcheck's keyword arguments for ``backend``: AOT dispatch traces the op's body, where
    wrap_triton intercepts compiled kernels but not interpreted ones, so under the
    interpreter that check is left to the GPU run."""
    if interpreted(backend):
        return {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")}
    return {}


def assert_compiles_fullgraph(op, args) -> None:
    """``op(*args)`` under torch.compile(fullgraph=True) gives exactly the eager result."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True)
    torch.testing.assert_close(compiled(*args), op(*args), rtol=0, atol=0)
