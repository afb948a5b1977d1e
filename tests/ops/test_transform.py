"""The transform op (z = u Wᵀ + b, h = σ(z), aux) against its float64 reference."""
import pytest
import torch

from localprop import ops
from localprop.ops import activation as act
from tests.ops.conftest import (ACTIVATIONS, LARGE_SIZE, LAYOUTS, assert_close_to_ref, kernel_backend, layout,
                                make_gen, poison_allocator)

#: (B, K, N): every odd size in every position, and one large K
SHAPES = [(1, 7, 37), (7, 37, 129), (37, 129, 1), (129, 1, 7), (1, 1, 1), (16, LARGE_SIZE, 37)]


def inputs(rows, k, n, dtype, bias=True, seed=0):
    gen = make_gen(seed)
    u = torch.randn(rows, k, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(n, k, generator=gen, dtype=torch.float64) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    return u, w, b


def check(backend, u, w, b, activation):
    poison_allocator(u.shape[0] * w.shape[0], u.dtype)
    h, aux = ops.transform(u, w, b, activation, backend)
    up = [None if t is None else t.double() for t in (u, w, b)]
    h64, aux64 = ops.transform_ref(*up, activation)
    h_same, aux_same = ops.transform_ref(u, w, b, activation)
    if u.dtype == torch.float64:
        assert_close_to_ref(h, h64, h64, ulps=64)
    else:
        assert_close_to_ref(h, h64, h_same)
    if activation == "relu":
        # the mask must be torch's own bit for bit, but where z is within rounding of 0
        z64 = torch.nn.functional.linear(*up)
        differ = act.unpack_mask(aux, h.shape[1]) != act.unpack_mask(aux_same, h.shape[1])
        assert (z64[differ].abs() < 1e-5).all()
    elif activation == "gelu":
        assert_close_to_ref(aux, aux64, aux_same, ulps=64 if u.dtype == torch.float64 else 4)
    else:
        assert aux.numel() == 0


@kernel_backend
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, shape, activation, dtype):
    check(backend, *inputs(*shape, dtype), activation)


@kernel_backend
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_non_contiguous_inputs(backend, kind, activation):
    u, w, b = inputs(37, 129, 7, torch.float32)
    check(backend, layout(u, kind), layout(w, kind), b, activation)


@kernel_backend
def test_without_bias(backend):
    check(backend, *inputs(7, 37, 129, torch.float32, bias=False), "relu")


@kernel_backend
def test_rejects_mismatched_shapes(backend):
    u, w, b = inputs(7, 37, 129, torch.float32)
    with pytest.raises(RuntimeError, match="weight expects 37"):
        ops.transform(u[:, :5], w, b, "relu", backend)


@kernel_backend
@pytest.mark.parametrize("activation", [1, 4])
def test_opcheck(backend, activation):
    torch.library.opcheck(torch.ops.localprop.transform.default, inputs(7, 13, 11, torch.float64) + (activation,))


@kernel_backend
def test_compiles_fullgraph(backend):
    compiled = torch.compile(lambda u, w, b: torch.ops.localprop.transform(u, w, b, 4), fullgraph=True)
    u, w, b = inputs(7, 13, 11, torch.float64)
    for got, want in zip(compiled(u, w, b), torch.ops.localprop.transform(u, w, b, 4)):
        assert torch.equal(got, want)
