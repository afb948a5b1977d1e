"""The one CSV schema of every benchmark result the project writes, its writer and its
reader, and the tables and plots made from it.

A row is one figure: ``metric`` (e.g. "median_ms", "peak_mib", "acc_mean") of ``provider``
(a backend, a rule, a loop) on ``case`` (an op, a step, a model) at ``shape`` (its
parameters as space-separated ``key=value``), with p20/p80 where the figure is a median of
repeated timings, and ``ratio`` (with ``ratio_p20``/``ratio_p80`` when it comes from
paired timings) to the provider named in ``baseline``. ``versions`` holds
``torch=... triton=... localprop=...``. Empty cells mean "not measured".

    python -m localprop.benchresults bench/results/cpu_fused.csv [--metric median_ms] [--plot out.png]

prints each file's rows as a Markdown table (the README's tables come from here) and
draws the medians with their p20-p80 bars.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib.metadata
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

FIELDS = ("case", "provider", "shape", "dtype", "threads", "device", "metric", "median", "p20", "p80",
          "ratio", "ratio_p20", "ratio_p80", "baseline", "versions", "git_sha", "date")
#: the numeric columns, parsed to float by read() (None where the cell is empty)
NUMBERS = ("median", "p20", "p80", "ratio", "ratio_p20", "ratio_p80")


@dataclass
class Result:
    """One row of the schema (see the module's docstring)."""
    case: str
    provider: str
    metric: str
    median: float
    shape: str = ""
    dtype: str = ""
    threads: int | str = ""
    device: str = ""
    p20: float | None = None
    p80: float | None = None
    ratio: float | None = None
    ratio_p20: float | None = None
    ratio_p80: float | None = None
    baseline: str = ""
    versions: str = ""
    git_sha: str = ""
    date: str = ""

    def row(self) -> dict[str, str]:
        """The CSV cells: numbers as the shortest text that reads back the same float, None as
        an empty cell."""
        cells = dataclasses.asdict(self)
        return {k: "" if cells[k] is None else repr(float(cells[k])) if k in NUMBERS else str(cells[k])
                for k in FIELDS}


# ---- statistics --------------------------------------------------------------------
def quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of ``samples`` (linear interpolation between order statistics,
    as numpy's default and triton.testing.do_bench's quantiles)."""
    if not samples:
        raise ValueError("quantiles: no samples")
    xs = sorted(samples)

    def at(q: float) -> float:
        pos = q * (len(xs) - 1)
        lo = int(pos)
        return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)
    return at(0.5), at(0.2), at(0.8)


def paired_ratio(samples: Sequence[float], baseline: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of the round-by-round ratios samples[i] / baseline[i]: the two
    were timed in the same round, so load that drifts between rounds cancels in each ratio."""
    if len(samples) != len(baseline):
        raise ValueError(f"paired_ratio: {len(samples)} samples against {len(baseline)} of the baseline")
    return quantiles([s / b for s, b in zip(samples, baseline)])


def relative_spread(samples: Sequence[float]) -> float:
    """(p80 - p20) / median: the run-to-run spread as a fraction of the figure."""
    median, p20, p80 = quantiles(samples)
    return (p80 - p20) / median if median else 0.0


# ---- where and with what ------------------------------------------------------------
def device_name(device: torch.device | str = "cpu") -> str:
    """The GPU's name, else the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str:
    """The short sha of the checkout this module is in, or "unknown" (an installed copy)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def versions() -> str:
    """``torch=... triton=... localprop=...`` (``none`` for a package that is absent)."""
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "none"
    return f"torch={torch.__version__} triton={version('triton')} localprop={version('localprop')}"


def environment(device: torch.device | str = "cpu") -> dict[str, str | int]:
    """The columns that say where, when and with what a row was measured."""
    return {"device": device_name(device), "threads": torch.get_num_threads(), "versions": versions(),
            "git_sha": git_sha(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ---- writing and reading -------------------------------------------------------------
def header(path: Path) -> list[str] | None:
    """The first row of the CSV at ``path``, None if it is absent or empty."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open(newline="") as f:
        return next(csv.reader(f), None)


def write(path: Path | str, results: Iterable[Result]) -> Path:
    """Append ``results`` to the CSV at ``path`` (created with the header when new). A file
    with other columns is refused rather than mixed: its rows would no longer parse."""
    path = Path(path)
    found = header(path)
    if found is not None and tuple(found) != FIELDS:
        raise ValueError(f"{path} has the columns {','.join(found)}, not the results schema; "
                         "write to another file or convert it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if found is None:
            writer.writeheader()
        writer.writerows(r.row() for r in results)
    return path


def read(path: Path | str) -> list[Result]:
    """The rows of a results CSV; ValueError if its header is not exactly FIELDS."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != FIELDS:
            raise ValueError(f"{path}: columns {','.join(reader.fieldnames or ())} are not the results schema "
                             f"({','.join(FIELDS)})")
        return [_parse(row) for row in reader]


def _parse(row: dict[str, str]) -> Result:
    values = {k: (float(v) if v else None) if k in NUMBERS else v for k, v in row.items()}
    values["threads"] = int(row["threads"]) if row["threads"].isdigit() else row["threads"]
    return Result(**values)


# ---- tables and plots ----------------------------------------------------------------
def _figure(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" + (f" [{low:.3g}, {high:.3g}]" if low is not None and high is not None else "")


def markdown(results: Sequence[Result], metric: str | None = None) -> str:
    """A Markdown table of ``results`` (only ``metric`` when given): case, shape,
    provider, median [p20, p80], ratio [p20, p80] to the baseline, and where measured."""
    lines = ["| case | shape | provider | metric | median [p20, p80] | ratio [p20, p80] | baseline | threads | "
             "device | git | date |", "|" + "---|" * 11]
    for r in results:
        if metric is None or r.metric == metric:
            lines.append(f"| {r.case} | {r.shape} | {r.provider} | {r.metric} | {_figure(r.median, r.p20, r.p80)} | "
                         f"{_figure(r.ratio, r.ratio_p20, r.ratio_p80)} | {r.baseline} | {r.threads} | {r.device} | "
                         f"{r.git_sha} | {r.date} |")
    return "\n".join(lines)


def plot(results: Sequence[Result], path: Path | str, metric: str) -> None:
    """Horizontal bars of ``metric`` per (case, shape, provider) with p20-p80 whiskers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r.metric == metric]
    if not rows:
        raise ValueError(f"plot: no rows of metric {metric!r}")
    labels = [f"{r.case} {r.shape} {r.provider}" for r in rows]
    errors = [[r.median - (r.p20 if r.p20 is not None else r.median) for r in rows],
              [(r.p80 if r.p80 is not None else r.median) - r.median for r in rows]]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [r.median for r in rows], xerr=errors, capsize=2)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel=f"{metric} (median, p20-p80)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Markdown tables (and a plot) of results CSVs")
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--metric", default=None, help="only this metric (e.g. median_ms)")
    p.add_argument("--plot", type=Path, default=None, help="PNG of the medians of --metric")
    args = p.parse_args(argv)
    results = [r for path in args.paths for r in read(path)]
    print(markdown(results, args.metric))
    if args.plot is not None:
        plot(results, args.plot, args.metric or results[0].metric)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
