"""Importing localprop (and localprop.kernels, and asking which backends are present on
CPU) never initialises CUDA and never imports triton. Checked in a fresh interpreter,
since this test process may have done either already."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
import torch
import localprop
import localprop.kernels
from localprop.ops import backends
backends.report(torch.device("cpu"))
print(json.dumps({"cuda_initialized": torch.cuda.is_initialized(), "triton_imported": "triton" in sys.modules}))
"""


def test_import_initialises_no_cuda_and_imports_no_triton():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert state == {"cuda_initialized": False, "triton_imported": False}
