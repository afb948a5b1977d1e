"""Builds localprop's C++ extension (localprop._C); all metadata is in pyproject.toml.

The CPU operators are always built. The CUDA operators are added when a CUDA
toolkit is found and the installed torch is a CUDA build. Set
LOCALPROP_NO_EXTENSION=1 for a Python-only install (the "reference" and
"triton" backends still work).
"""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # an isolated build has no torch: say how to build instead
    raise SystemExit(
        "localprop's extension is built against the installed torch: install torch first, "
        "then `pip install --no-build-isolation .` (or run `make`)."
    ) from exc


def extension():
    sources = ["csrc/localprop.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    flags = {"cxx": ["-O3", "-std=c++20", "-fopenmp"]}
    if with_cuda:
        flags["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
        return cpp_extension.CUDAExtension(
            "localprop._C", sources + cuda_sources, extra_compile_args=flags,
            extra_link_args=["-fopenmp"], define_macros=[("LOCALPROP_WITH_CUDA", None)])
    return cpp_extension.CppExtension(
        "localprop._C", sources, extra_compile_args=flags, extra_link_args=["-fopenmp"])


ext_modules = [] if os.environ.get("LOCALPROP_NO_EXTENSION") == "1" else [extension()]
setup(ext_modules=ext_modules, cmdclass={"build_ext": cpp_extension.BuildExtension})
