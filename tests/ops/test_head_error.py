"""The head-and-error op (softmax-CE, dlogits, ε = (dlogits A) ⊙ σ'(z), message ε W) on
every backend against its float64 reference: with and without a head, head bias and
message, odd sizes in every position, strided and transposed inputs, then narrow labels,
large logits, argument checks, opcheck and torch.compile(fullgraph=True)."""
import pytest
import torch

from localprop import ops
from tests.ops.cases import (ACTIVATIONS, BF16, F32, F64, LARGE_SIZE, assert_compiles_fullgraph, assert_matches,
                             backend_param, device, dtypes, head_inputs, kernels, layout, opcheck_utils, per_backend,
                             references, small)

#: (B, N, C or None for no head, head bias, K of the message or None), small enough for
#: Triton's interpreter
SMALL = [(7, 37, 3, True, 5), (37, 7, 129, False, None), (1, 10, None, False, 1), (16, 129, 7, True, 37)]
#: the others also take odd sizes in every position, a large N, C = 1, C = 1000, and a
#: last node (no head, no message)
SHAPES = SMALL + [(1, 37, 129, True, 7), (7, 129, 1, True, 37), (37, 1, 7, True, 129), (129, 7, 37, True, 1),
                  (16, LARGE_SIZE, 10, True, 37), (1, 7, 3, True, 37), (37, 129, 10, True, 7),
                  (129, 37, 1000, True, None), (37, 10, None, False, None), (37, 11, None, False, 7),
                  (7, 129, 10, False, 37)]


def matrix(backend):
    """(dtype, param dtype, case, layout, activation) of every case of ``backend``."""
    shapes = SMALL if small(backend) else SHAPES
    cases = [(d, None, s, k, a) for d in dtypes(backend) for s in shapes for k in ("contiguous", "strided")
             for a in ACTIVATIONS]
    cases += [(d, None, (37, 129, 10, True, 7), "transposed", a) for d in dtypes(backend) for a in ACTIVATIONS]
    if backend == "cuda":  # bfloat16 activations, float32 master weights
        cases += [(BF16, F32, (37, 129, 10, True, 7), "contiguous", a) for a in ("relu", "gelu")]
    if backend == "triton" and device(backend).type == "cuda":
        cases.append((BF16, None, (129, 67, 10, True, 33), "contiguous", None))
    return cases


def check(backend, args, activation):
    h, aux, a, c, y, w = args
    out = ops.head_error(h, aux, a, c, y, activation, w, backend=backend)
    ref64, same, ref32 = references(
        lambda h_, aux_, a_, c_, w_: ops.head_error_ref(h_, aux_, a_, c_, y, activation, w_), (h, aux, a, c, w),
        h.dtype)
    for name in ("loss", "dlogits", "err", "message"):
        if getattr(same, name) is None:
            assert getattr(out, name) is None, name
        else:
            assert_matches(getattr(out, name), getattr(ref64, name), getattr(same, name), getattr(ref32, name), name)
    ptrs = [t.data_ptr() for t in out if t is not None and t.numel()]
    assert len(set(ptrs)) == len(ptrs), "outputs alias each other"
    assert not set(ptrs) & {t.data_ptr() for t in args if t is not None and t.numel()}, "an output aliases an input"


@per_backend("dtype,param_dtype,case,kind,activation", matrix)
def test_matches_reference(backend, dtype, param_dtype, case, kind, activation):
    h, aux, a, c, y, w = head_inputs(*case, dtype, activation, device(backend), param_dtype)
    mask_kind = kind if aux.is_floating_point() or kind == "strided" else "contiguous"
    check(backend, (layout(h, kind), layout(aux, mask_kind), layout(a, kind), layout(c, kind), layout(y, kind),
                    layout(w, kind)), activation)


@per_backend("label_dtype", lambda b: [torch.int32, torch.uint8], names=("cpp", "triton"))
def test_narrow_labels(backend, label_dtype):
    h, aux, a, c, y, w = head_inputs(7, 129, 10, True, 37, F64, "tanh", device(backend))
    got = ops.head_error(h, aux, a, c, y.to(label_dtype), "tanh", w, backend=backend)
    for g, want in zip(got, ops.head_error(h, aux, a, c, y, "tanh", w, backend=backend)):
        assert torch.equal(g, want)


@backend_param(names=("reference", "cpp", "triton"))
def test_large_logits_are_stable(backend):
    h, aux, a, c, y, w = head_inputs(7, 13, 10, True, 5, F32, None, device(backend))
    check(backend, (h * 1e4, aux, a, c, y, w), None)


@backend_param(names=("cpp",))
@pytest.mark.parametrize("change, match", [
    (lambda args: {**args, "y": args["y"] + 100}, r"labels must lie in \[0, 10\)"),
    (lambda args: {**args, "head_weight": args["head_weight"][:, :3]}, r"head_weight must be \[C, 13\]"),
    (lambda args: {**args, "aux": args["aux"][:, :1]}, "ReLU needs aux"),
    (lambda args: {**args, "y": args["y"][:3]}, r"y must be \[7\]"),
    (lambda args: {**args, "weight": args["weight"].float()}, "weight must have h's dtype"),
])
def test_rejects_bad_arguments(backend, change, match):
    h, aux, a, c, y, w = head_inputs(7, 13, 10, True, 5, F64, "relu")
    args = change(dict(h=h, aux=aux, head_weight=a, head_bias=c, y=y, activation=1, weight=w))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.localprop.head_error(*args.values())


#: (activation, with head and message) of the opcheck and torch.compile samples
SAMPLES = [("relu", True), ("gelu", True), (None, False)]


def sample(backend, activation, head):
    """(the backend's registered op, its arguments)."""
    kernels(backend)  # registers the triton ops
    name = "head_error_triton" if backend == "triton" else "head_error"
    h, aux, a, c, y, w = head_inputs(7, 13, 10 if head else None, head, 5 if head else None,
                                     F64 if backend == "cpp" else F32, activation, device(backend))
    return getattr(torch.ops.localprop, name).default, (h, aux, a, c, y, ops.activation.code(activation), w)


@per_backend("activation,head", lambda b: SAMPLES, names=("cpp", "triton", "cuda"))
def test_opcheck(backend, activation, head):
    torch.library.opcheck(*sample(backend, activation, head), **opcheck_utils(backend))


@per_backend("activation,head", lambda b: SAMPLES, names=("cpp", "cuda"))
def test_compiles_fullgraph(backend, activation, head):
    assert_compiles_fullgraph(*sample(backend, activation, head))
