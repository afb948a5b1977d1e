"""The transform op (z = u Wᵀ + b, h = σ(z), aux) on every backend against its float64
reference: odd sizes in every position, strided and transposed inputs, float64/float32
(CPU and triton), float32/bfloat16 (cuda, with float32 master weights too), then
opcheck and torch.compile(fullgraph=True)."""
import pytest
import torch

from localprop import ops
from localprop.ops import activation as act
from tests.ops.cases import (ACTIVATIONS, BF16, F32, F64, LARGE_SIZE, assert_compiles_fullgraph, assert_matches,
                             backend_param, device, kernels, opcheck_utils, per_backend, small, references,
                             transform_inputs, dtypes, layout)

#: (B, K, N): small enough for Triton's interpreter, every odd size in several positions
SMALL = [(1, 7, 37), (37, 129, 7), (7, 1, 129), (129, 37, 1)]
#: the others also take 1 x 1 x 1, a large K, and one large enough for many blocks
SHAPES = SMALL + [(7, 37, 129), (37, 129, 1), (129, 1, 7), (1, 1, 1), (16, LARGE_SIZE, 37), (129, LARGE_SIZE, 257)]


def matrix(backend):
    """(dtype, param dtype, shape, layout, activation) of every case of ``backend``."""
    shapes = SMALL if small(backend) else SHAPES
    cases = [(d, None, s, k) for d in dtypes(backend) for s in shapes for k in ("contiguous", "strided")]
    cases += [(d, None, (37, 129, 7), "transposed") for d in dtypes(backend)]
    if backend == "cuda":  # bfloat16 activations, float32 master weights
        cases.append((BF16, F32, (37, 129, 65), "contiguous"))
    if backend == "triton" and device(backend).type == "cuda":
        cases.append((BF16, None, (129, 257, 67), "contiguous"))
    return [(*c, a) for c in cases for a in ACTIVATIONS]


def check(backend, u, w, b, activation):
    h, aux = ops.transform(u, w, b, activation, backend)
    (h64, aux64), (h_same, aux_same), (h32, aux32) = references(
        lambda *a: ops.transform_ref(*a, activation), (u, w, b), u.dtype)
    assert_matches(h, h64, h_same, h32, "h")
    if activation == "relu":  # the mask says exactly where the kernel's own h is positive
        assert aux.dtype == torch.uint8 and torch.equal(aux, act.pack_mask(h > 0)), "mask bits (or padding)"
    elif activation == "gelu":
        assert_matches(aux, aux64, aux_same, aux32, "z")
    else:
        assert aux.numel() == 0


@per_backend("dtype,param_dtype,shape,kind,activation", matrix)
def test_matches_reference(backend, dtype, param_dtype, shape, kind, activation):
    u, w, b = transform_inputs(*shape, dtype, device(backend), param_dtype)
    check(backend, layout(u, kind), layout(w, kind), layout(b, kind), activation)


@per_backend("shape", lambda b: [(5, 9, 17)] + ([] if small(b) else [(7, 37, 129)]))
def test_without_bias(backend, shape):
    check(backend, *transform_inputs(*shape, F32, device(backend), bias=False), "relu")


@backend_param(names=("cpp",))
def test_rejects_mismatched_shapes(backend):
    u, w, b = transform_inputs(7, 37, 129, F32)
    with pytest.raises(RuntimeError, match="weight expects 37"):
        ops.transform(u[:, :5], w, b, "relu", backend)


#: (activation, with bias) of the opcheck and torch.compile samples
SAMPLES = [("relu", True), ("gelu", True), ("gelu", False)]


def sample(backend, activation, bias):
    """(the backend's registered op, its arguments)."""
    name = "transform_triton" if backend == "triton" else "transform"
    kernels(backend)  # registers the triton ops
    args = transform_inputs(7, 13, 11, F64 if backend == "cpp" else F32, device(backend), bias=bias)
    return getattr(torch.ops.localprop, name).default, (*args, act.code(activation))


@per_backend("activation,bias", lambda b: SAMPLES, names=("cpp", "triton", "cuda"))
def test_opcheck(backend, activation, bias):
    torch.library.opcheck(*sample(backend, activation, bias), **opcheck_utils(backend))


@per_backend("activation,bias", lambda b: SAMPLES, names=("cpp", "cuda"))
def test_compiles_fullgraph(backend, activation, bias):
    assert_compiles_fullgraph(*sample(backend, activation, bias))
