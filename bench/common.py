"""What every benchmark script shares: the environment stamp of a result row and CSV output."""
from __future__ import annotations

import csv
import datetime
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=RESULTS.parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def stamp(device: str = "cpu") -> dict:
    """Columns that say where and with what a row was measured."""
    name = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name()
    return {"date": datetime.date.today().isoformat(), "device": name, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "git": git_sha()}


def append_rows(name: str, rows: list[dict]) -> Path:
    """Append ``rows`` to bench/results/<name>.csv (header written when the file is new)."""
    path = RESULTS / f"{name}.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path
