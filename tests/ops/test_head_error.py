"""The head-and-error op (softmax-CE, dlogits, ε = (dlogits A) ⊙ σ'(z), message ε W)
against its float64 reference."""
import pytest
import torch

from localprop import ops
from tests.ops.conftest import (ACTIVATIONS, LARGE_SIZE, LAYOUTS, assert_close_to_ref, kernel_backend, layout,
                                make_gen, poison_allocator)

#: (B, K, N, C): odd sizes in every position, one large N, and C = 1 (a single class)
SHAPES = [(1, 7, 37, 129), (7, 37, 129, 1), (37, 129, 1, 7), (129, 1, 7, 37), (16, 37, LARGE_SIZE, 10)]


def inputs(rows, k, n, classes, dtype, activation, head=True, seed=0):
    """(h, aux, A, c, y, W) with h, aux from the float64 reference transform, cast to dtype."""
    gen = make_gen(seed)
    u = torch.randn(rows, k, generator=gen, dtype=torch.float64)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) / k ** 0.5
    h, aux = ops.transform_ref(u, w, None, activation)
    a = torch.randn(classes, n, generator=gen, dtype=torch.float64) / n ** 0.5 if head else None
    c = torch.randn(classes, generator=gen, dtype=torch.float64) if head else None
    y = torch.randint(0, classes if head else n, (rows,), generator=gen)
    cast = [None if t is None else t.to(dtype) for t in (h, aux if aux.is_floating_point() else None, a, c, w)]
    return cast[0], aux if cast[1] is None else cast[1], cast[2], cast[3], y, cast[4]


def upcast(args):
    return [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]


def check(backend, args, activation, with_message=True):
    h, aux, a, c, y, w = args
    w = w if with_message else None
    classes = h.shape[1] if a is None else a.shape[0]
    poison_allocator(h.shape[0] * max(h.shape[1], classes), h.dtype)
    out = ops.head_error(h, aux, a, c, y, activation, w, backend=backend)
    ref64 = ops.head_error_ref(*upcast((h, aux, a, c, y)), activation, None if w is None else w.double())
    same = ops.head_error_ref(h, aux, a, c, y, activation, w)
    for name in ("loss", "dlogits", "err", "message"):
        got, want64, want = getattr(out, name), getattr(ref64, name), getattr(same, name)
        if want is None:
            assert got is None, name
        elif h.dtype == torch.float64:
            assert_close_to_ref(got, want64, want64, ulps=64)
        else:
            assert_close_to_ref(got, want64, want)


@kernel_backend
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, shape, activation, dtype):
    check(backend, inputs(*shape, dtype, activation), activation)


@kernel_backend
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_last_node_without_head(backend, activation, dtype):
    check(backend, inputs(37, 7, 10, None, dtype, activation, head=False), activation, with_message=False)


@kernel_backend
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_non_contiguous_inputs(backend, kind, activation):
    h, aux, a, c, y, w = inputs(37, 7, 129, 10, torch.float32, activation)
    aux = layout(aux, kind) if activation == "gelu" else aux
    check(backend, (layout(h, kind), aux, layout(a, kind), c, y[::1], layout(w, kind)), activation)


@kernel_backend
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.uint8])
def test_narrow_labels(backend, label_dtype):
    h, aux, a, c, y, w = inputs(7, 37, 129, 10, torch.float64, "tanh")
    got = ops.head_error(h, aux, a, c, y.to(label_dtype), "tanh", w, backend=backend)
    for g, want in zip(got, ops.head_error(h, aux, a, c, y, "tanh", w, backend=backend)):
        assert torch.equal(g, want)


@kernel_backend
def test_without_head_bias(backend):
    h, aux, a, _, y, w = inputs(7, 37, 129, 10, torch.float32, "tanh")
    check(backend, (h, aux, a, None, y, w), "tanh")


@kernel_backend
def test_large_logits_are_stable(backend):
    h, aux, a, c, y, w = inputs(7, 5, 13, 10, torch.float32, None)
    check(backend, (h * 1e4, aux, a, c, y, w), None)


@kernel_backend
@pytest.mark.parametrize("head", [True, False])
def test_outputs_alias_nothing(backend, head):
    h, aux, a, c, y, w = inputs(7, 5, 13, 10, torch.float64, None, head=head)
    out = ops.head_error(h, aux, a, c, y, None, w, backend=backend)
    ptrs = [t.data_ptr() for t in out]
    assert len(set(ptrs)) == 4
    assert not set(ptrs) & {t.data_ptr() for t in (h, a, c, w) if t is not None}


@kernel_backend
@pytest.mark.parametrize("change, match", [
    (lambda args: {**args, "y": args["y"] + 100}, r"labels must lie in \[0, 10\)"),
    (lambda args: {**args, "head_weight": args["head_weight"][:, :3]}, r"head_weight must be \[C, 13\]"),
    (lambda args: {**args, "aux": args["aux"][:, :1]}, "ReLU needs aux"),
    (lambda args: {**args, "y": args["y"][:3]}, r"y must be \[7\]"),
    (lambda args: {**args, "weight": args["weight"].float()}, "weight must have h's dtype"),
])
def test_rejects_bad_arguments(backend, change, match):
    h, aux, a, c, y, w = inputs(7, 5, 13, 10, torch.float64, "relu")
    args = change(dict(h=h, aux=aux, head_weight=a, head_bias=c, y=y, activation=1, weight=w))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.localprop.head_error(*args.values())


@kernel_backend
@pytest.mark.parametrize("activation, head", [("relu", True), ("gelu", True), (None, False)])
def test_opcheck(backend, activation, head):
    h, aux, a, c, y, w = inputs(7, 5, 13, 10, torch.float64, activation, head=head)
    code = ops.activation.code(activation)
    torch.library.opcheck(torch.ops.localprop.head_error.default, (h, aux, a, c, y, code, w if head else None))


@kernel_backend
def test_compiles_fullgraph(backend):
    h, aux, a, c, y, w = inputs(7, 5, 13, 10, torch.float64, "relu")
    op = torch.ops.localprop.head_error
    compiled = torch.compile(lambda *args: op(*args, 1, w), fullgraph=True)
    for got, want in zip(compiled(h, aux, a, c, y), op(h, aux, a, c, y, 1, w)):
        assert torch.equal(got, want)
