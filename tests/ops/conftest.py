"""Shared by the op tests: which backends to test, odd sizes, non-contiguous layouts,
allocator poisoning and the dtype-scaled tolerance ("a kernel's error against the
float64 reference is at most twice PyTorch's own error in the same dtype")."""
import pytest
import torch

from localprop.ops import backends

CPU = torch.device("cpu")

#: compiled backends to hold against the reference on CPU (triton has its own tests)
KERNEL_BACKENDS = [b for b in ("cpp",) if backends.why_unavailable(b, CPU) is None]

#: deliberately odd sizes: 1, below and above a vector width, above a tile, and ~1000
ODD_SIZES = (1, 7, 37, 129)
LARGE_SIZE = 1000

ACTIVATIONS = (None, "relu", "tanh", "sigmoid", "gelu")
LAYOUTS = ("contiguous", "strided", "transposed")


def kernel_backend(fn):
    """Parametrize a test over KERNEL_BACKENDS (skipped when none is built)."""
    params = KERNEL_BACKENDS or [pytest.param("cpp", marks=pytest.mark.skip(
        reason=backends.why_unavailable("cpp", CPU)))]
    return pytest.mark.parametrize("backend", params)(fn)


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t`` (2-D) with the same values in another memory layout: "strided" is every other
    column of a wider tensor, "transposed" is a column-major copy."""
    if kind == "contiguous" or t.dim() != 2:
        return t.contiguous()
    if kind == "strided":
        wide = torch.full((t.shape[0], 2 * t.shape[1]), float("nan"), dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t.t().contiguous().t()


def poison_allocator(numel: int, dtype: torch.dtype) -> None:
    """Fill and free a few NaN blocks of about ``numel`` elements, so that outputs the op
    allocates next are likely to start as NaN and any element it fails to write shows."""
    blocks = [torch.full((max(numel, 1) + extra,), float("nan"), dtype=dtype) for extra in (0, 7, 64)]
    del blocks


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, ref_same_dtype: torch.Tensor, ulps: float = 4) -> None:
    """|out - ref64| <= 2 |ref_same_dtype - ref64| (max over elements) + a floor of a few
    ulps of out's dtype at ref64's scale, for outputs PyTorch happens to get exact."""
    assert out.shape == ref64.shape, f"shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == ref_same_dtype.dtype, f"dtype {out.dtype} != {ref_same_dtype.dtype}"
    assert torch.isfinite(out).all(), "non-finite values in the output"
    if out.numel() == 0:
        return
    ref64 = ref64.double()
    err = (out.double() - ref64).abs().max().item()
    torch_err = (ref_same_dtype.double() - ref64).abs().max().item()
    floor = ulps * torch.finfo(out.dtype).eps * max(ref64.abs().max().item(), torch.finfo(out.dtype).tiny)
    assert err <= 2 * torch_err + floor, f"error {err:.3g} > 2 x torch's {torch_err:.3g} + {floor:.3g}"


def make_gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
