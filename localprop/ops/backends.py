"""Which backend runs the fused ops: names, availability, and the choice of "auto".

Backends: "reference" (PyTorch, the test oracle, always present), "cpp" (the C++
extension on CPU), "cuda" (the same extension built with CUDA), "triton" (kernels in
localprop.kernels). Asking for a backend that is absent raises BackendUnavailable
saying how to get it; there is no silent fallback. Nothing here initialises CUDA.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

NAMES = ("reference", "cpp", "triton", "cuda")
ENV_VAR = "LOCALPROP_BACKEND"


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name and is not present on this machine."""


@functools.cache
def extension_error() -> str | None:
    """None if localprop._C loads (and registers its ops), else why not."""
    try:
        importlib.import_module("localprop._C")
    except ImportError as exc:
        return f"the C++ extension localprop._C is not built ({exc})"
    from . import fake  # noqa: F401  (fake kernels need the schemas loaded first)
    return None


#: The ops every compiled backend must implement before it can be chosen.
KERNEL_OPS = ("transform", "head_error", "sgd_update_", "adam_update_")


def missing_kernels(dispatch_key: str) -> list[str]:
    """The KERNEL_OPS the extension has no ``dispatch_key`` ("CPU"/"CUDA") kernel for."""
    if extension_error() is not None:
        return list(KERNEL_OPS)
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return [op for op in KERNEL_OPS
            if not torch._C._dispatch_has_kernel(f"localprop::{op}") or not has(f"localprop::{op}", dispatch_key)]


def _triton_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton)"
    return None


def why_unavailable(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can run on ``device``, else a sentence saying how to get it."""
    if name == "reference":
        return None
    if name == "cpp":
        if device.type != "cpu":
            return "the cpp backend runs on CPU tensors; use 'cuda' or 'triton' on a GPU"
        err = extension_error()
        if err is not None:
            return f"{err}; build it with `make` or `pip install --no-build-isolation -e .`"
        missing = missing_kernels("CPU")
        return f"localprop._C lacks CPU kernels for {', '.join(missing)}; rebuild it" if missing else None
    if name == "cuda":
        if device.type != "cuda":
            return "the cuda backend runs on CUDA tensors"
        if missing_kernels("CUDA"):
            return ("localprop._C was built without CUDA; rebuild with a CUDA toolkit (nvcc) and a CUDA "
                    "build of torch present: `pip install --no-build-isolation -e .`")
        return None
    if name == "triton":
        err = _triton_error()
        if err is None and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            err = "triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
        return err
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(NAMES)} or 'auto'")


def requested(backend: str | None) -> str:
    """The backend name a user asked for: the argument, else $LOCALPROP_BACKEND, else "auto"."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if name != "auto" and name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(NAMES)} or 'auto'")
    return name


def resolve(backend: str | None, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``. "auto" takes the fastest present
    (CPU: cpp, else reference; CUDA: cuda, triton, reference in that order)."""
    name = requested(backend)
    if name == "auto":
        order = ("cpp", "reference") if device.type == "cpu" else ("cuda", "triton", "reference")
        return next(n for n in order if why_unavailable(n, device) is None)
    err = why_unavailable(name, device)
    if err is not None:
        raise BackendUnavailable(f"backend {name!r} is not available: {err}")
    return name


def report(device: torch.device) -> dict[str, str]:
    """Backend name -> "yes" or the reason it is absent, for ``localprop info``."""
    return {name: why_unavailable(name, device) or "yes" for name in NAMES}
