"""Every CUDA source compiles with nvcc, even where torch is a CPU build and no GPU is
present, so that a syntax or type error in csrc/cuda cannot land unnoticed.

The flags are those setup.py and torch's BuildExtension pass for the real build. A CPU
wheel of torch ships the ATen and c10/cuda headers the sources use, but not the
CMake-generated c10/cuda/impl/cuda_cmake_macros.h; its only definition matters for
Windows DLL exports, and c10 has a switch (C10_CUDA_NO_CMAKE_CONFIGURE_FILE) to do
without it, which is set only when the header is absent. The sources include no cuBLAS
header (their GEMMs go through ATen), so a bare CUDA toolkit is enough.
"""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
#: compiles at once: each nvcc run with torch's headers takes ~30 s and ~1 GB
PARALLEL = 2


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME, else PATH, else the default toolkit location."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(home) / "bin" / "nvcc"] if home else []
    on_path = shutil.which("nvcc")
    candidates += ([Path(on_path)] if on_path else []) + [Path("/usr/local/cuda/bin/nvcc")]
    return next((str(c) for c in candidates if c.is_file()), None)


def torch_defines() -> list[str]:
    """The ABI define of the installed torch, plus the switch for a missing CMake header."""
    flags = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    generated = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(d) / generated).is_file() for d in cpp_extension.include_paths()):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def nvcc_command(nvcc: str, source: Path, out_dir: Path) -> list[str]:
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    return ([nvcc, "-c", "-x", "cu", "-std=c++20", "-gencode", "arch=compute_90,code=sm_90",
             "-Xcompiler", "-fPIC", "-DLOCALPROP_WITH_CUDA"]
            + cpp_extension.COMMON_NVCC_FLAGS + torch_defines()
            + [f"-I{d}" for d in includes] + [str(source), "-o", str(out_dir / (source.stem + ".o"))])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Source name -> nvcc's result, compiled PARALLEL at a time."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found ($CUDA_HOME, PATH, /usr/local/cuda): the CUDA sources are not compiled")
    out_dir = tmp_path_factory.mktemp("nvcc")

    def run(source: Path) -> subprocess.CompletedProcess:
        return subprocess.run(nvcc_command(nvcc, source, out_dir), capture_output=True, text=True, timeout=600)

    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        return dict(zip((s.name for s in SOURCES), pool.map(run, SOURCES)))


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda has no .cu files"


@pytest.mark.parametrize("name", [s.name for s in SOURCES])
def test_compiles(compiled, name):
    result = compiled[name]
    assert result.returncode == 0, f"nvcc failed on csrc/cuda/{name}:\n{result.stderr}"
