"""The activation codes have one definition per language and these tests keep them equal.

Python: localprop/ops/activation.py (NONE..GELU, CODES), which the Triton kernels and
the fake kernels import. C++/CUDA: enum Activation in csrc/activation.h, which g++ and
nvcc read at compile time and which cannot import Python. The header is checked rather
than generated: it has five entries that do not change, and a generated header would
need a build step in every place that compiles csrc (setup.py, the nvcc compile test,
`make asan`). A drift fails here, both in the header's text and in the compiled ops.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from localprop.ops import activation, backends

HEADER = Path(__file__).resolve().parents[2] / "csrc" / "activation.h"
#: the Triton kernels where they are installed (kernels/ of a checkout), and the fakes
_KERNELS = importlib.util.find_spec("localprop.kernels")
SOURCES = (sorted(Path(_KERNELS.origin).parent.glob("*.py")) if _KERNELS else []) + [
    Path(activation.__file__).with_name("fake.py")]
#: enumerator of csrc/activation.h -> activation name in localprop/ops/activation.py
CPP_NAMES = {"kNone": None, "kRelu": "relu", "kTanh": "tanh", "kSigmoid": "sigmoid", "kGelu": "gelu"}


def header_codes() -> dict[str, int]:
    if not HEADER.is_file():  # a copy of the tests without the sources (make asan)
        pytest.skip(f"no C++ sources at {HEADER.parent}")
    text = HEADER.read_text()
    enum = re.search(r"enum\s+Activation\s*:\s*int64_t\s*\{([^}]*)\}", text)
    assert enum, "csrc/activation.h has no `enum Activation : int64_t { ... }`"
    return {name: int(value) for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", enum.group(1))}


def test_header_matches_python():
    codes = header_codes()
    assert set(codes) == set(CPP_NAMES), f"csrc/activation.h enumerators {sorted(codes)}"
    assert {CPP_NAMES[k]: v for k, v in codes.items()} == activation.CODES


def test_python_names_and_codes():
    assert activation.CODES == {None: activation.NONE, "relu": activation.RELU, "tanh": activation.TANH,
                                "sigmoid": activation.SIGMOID, "gelu": activation.GELU}
    # the ops check a code as kNone <= code <= kGelu: the codes are 0..n-1
    assert sorted(activation.CODES.values()) == list(range(len(activation.CODES)))


def test_sources_found():
    assert _KERNELS is not None, "localprop.kernels is not importable"
    assert len(SOURCES) >= 4 and all(p.is_file() for p in SOURCES), SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_literal_codes(path):
    """Kernels and fakes compare activations with the named codes, never with numbers."""
    literal = re.findall(r"\b(?:ACTIVATION|activation)\s*[!=]=\s*\d+", path.read_text())
    assert not literal, f"{path.name} compares activation codes with literals: {literal}"


def test_triton_constexprs():
    pytest.importorskip("triton", reason="the triton kernels need the triton package")
    from localprop.kernels import head_error, transform

    for module in (transform, head_error):
        for name in ("RELU", "TANH", "SIGMOID", "GELU"):
            assert getattr(module, "_" + name).value == getattr(activation, name), (module.__name__, name)


needs_cpp = pytest.mark.skipif(backends.why_unavailable("cpp", torch.device("cpu")) is not None,
                               reason="the C++ extension is not built")


@needs_cpp
@pytest.mark.parametrize("name", list(activation.CODES))
def test_compiled_transform_reads_python_codes(name):
    """The built C++ op applies, for each Python code, the activation of that name and keeps
    the aux that name needs."""
    u, w = torch.randn(5, 7, dtype=torch.float64), torch.randn(11, 7, dtype=torch.float64)
    h, aux = torch.ops.localprop.transform(u, w, None, activation.code(name))
    z = u @ w.t()
    torch.testing.assert_close(h, activation.apply(z, name))
    want = activation.keep_for_grad(z, name)
    assert (aux.dtype, aux.shape) == (want.dtype, want.shape)


@needs_cpp
def test_compiled_code_range_is_python_range():
    """head_error takes exactly the codes that Python defines."""
    h = torch.randn(4, 6, dtype=torch.float64)
    y = torch.randint(0, 6, (4,))
    name_of = {code: name for name, code in activation.CODES.items()}
    last = max(name_of)
    torch.ops.localprop.head_error(h, activation.keep_for_grad(h, name_of[last]), None, None, y, last, None)
    with pytest.raises(RuntimeError, match="unknown activation code"):
        torch.ops.localprop.head_error(h, h.new_empty(0), None, None, y, last + 1, None)
