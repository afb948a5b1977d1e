"""What every benchmark script shares: the environment stamp of a result row and CSV output."""
from __future__ import annotations

import csv
import datetime
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

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


def timings_ms(steps: dict[str, Callable[[], object]], rounds: int, per_round: int) -> dict[str, tuple[float, float]]:
    """(median, min) time per call in ms of each callable, measured round-robin so that
    drift in the machine's load falls on every variant alike; each is warmed up first.
    The min goes beside the median because a shared machine adds heavy noise."""
    for fn in steps.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            times[name].append((time.perf_counter() - t0) / per_round * 1e3)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def show(title: str, rows: list[dict]) -> None:
    """Print rows as a plain table under a title."""
    print(f"\n{title}")
    keys = list(rows[0])
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys))
