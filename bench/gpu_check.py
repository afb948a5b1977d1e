"""One-command GPU check: environment, CUDA build, GPU tests and the GPU suite.

    python3 bench/gpu_check.py                   # every stage; results under $OUT, else out/gpu
    python3 bench/gpu_check.py --dry-run         # every stage's commands, nothing run
    python3 bench/gpu_check.py --quick --skip-build
    python3 bench/gpu_check.py --sizes 1024x1024 4096x4096

Stages, each a child process whose output is shown as it comes and kept in
``<out>/logs/<stage>.log``; a stage fails by a non-zero exit or by running past its time,
and the tail of its log is printed. A failed env or build stage stops the check (nothing
after it can run); failed tests do not stop the benchmark, which measures the same
kernels whatever a test found, and the check's exit status still says they failed:

1. env    the device, its capability, torch / triton / python versions, git sha;
          no CUDA device is a failure that says so;
2. build  an editable install (pip, offline) of the package with its CUDA ops for this GPU only
          (TORCH_CUDA_ARCH_LIST from the device's capability, MAX_JOBS = cores), then a
          check that the "cuda" backend is present;
3. tests  ``pytest -m gpu`` with a per-test timeout, junit XML kept, across
          pytest-xdist workers when it is installed (Triton's compiles dominate serially);
4. bench  the fused greedy step (backends cuda, triton) against the plain PyTorch loop a
          user would write (autograd per node, torch.optim SGD fused=True) and against the
          step's GEMMs alone, fp32 and bf16, ``triton.testing.do_bench`` medians with
          inputs rotated beyond the L2; and the peak step memory of greedy vs bp on a
          16-node MLP.

Written under the output folder: summary.md, results.csv (one row per measurement, in
localprop.benchresults' schema), gpu_check.png, junit.xml, logs/. The driver needs
neither torch nor CUDA; only the child stages import them.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()

#: (width, batch) pairs of the default run: widths 512..8192, batches 256..8192. On the
#: first H200 run the build took 60 s, the tests 100 s (xdist) and a quick bench of three
#: of these sizes about 60 s; the whole default list has not yet run there.
DEFAULT_SIZES = ((512, 256), (1024, 1024), (2048, 4096), (4096, 256), (4096, 4096), (8192, 8192))
QUICK_SIZES = ((512, 256), (2048, 2048))
MAX_SIZES = 8           #: at most this many sizes per run, so a run stays bounded
MAX_EDGE = 8192         #: largest width or batch accepted by --sizes
DTYPES = ("fp32", "bf16")
BACKENDS = ("cuda", "triton")
CLASSES = 10            #: classes of every head and of the MLP's logits
STEP_NODES = 4          #: nodes of the timed MLP: 3 hidden ReLU nodes and the output node
MEMORY_NODES = 16       #: nodes of the MLP whose peak step memory is compared
MEMORY_SIZE = (4096, 4096)
TAIL_LINES = 40         #: lines of a failed stage's log shown

#: Seconds each stage may take at most; the whole run is further bounded by --timeout.
STAGE_LIMITS = {"env": 120, "build": 300, "tests": 300, "bench": 360}
DEFAULT_BUDGET = 480    #: --timeout default: the whole check, build included
TEST_TIMEOUT = 120      #: per GPU test
#: most pytest-xdist workers of the tests stage: on an H200 with 16 cores, 12 ran the 1583
#: GPU tests in 100 s where one got through 45% of them in 300 s
MAX_TEST_WORKERS = 12

NO_CUDA_EXIT = 3        #: exit status of the env stage when no CUDA device is visible


# ---- sizes and arguments -----------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    """``"WIDTHxBATCH"`` -> (width, batch); both integers in [1, MAX_EDGE]."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"a size is WIDTHxBATCH, e.g. 4096x4096; got {text!r}")
    width, batch = int(parts[0]), int(parts[1])
    if not (1 <= width <= MAX_EDGE and 1 <= batch <= MAX_EDGE):
        raise argparse.ArgumentTypeError(f"width and batch must be in [1, {MAX_EDGE}]; got {text!r}")
    return width, batch


def sizes_for(args) -> list[tuple[int, int]]:
    """The sizes to run: --sizes, else --quick's short list, else the default list."""
    if args.sizes:
        return list(args.sizes)
    return list(QUICK_SIZES if args.quick else DEFAULT_SIZES)


def format_size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def memory_size(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (width, batch) of the memory comparison: 4096x4096 when listed, else the
    largest listed size of width <= 4096 (else the smallest), so --quick stays quick."""
    if MEMORY_SIZE in sizes:
        return MEMORY_SIZE
    small = [s for s in sizes if s[0] <= MEMORY_SIZE[0]] or [min(sizes, key=lambda s: s[0] * s[1])]
    return max(small, key=lambda s: s[0] * s[1])


def default_out() -> Path:
    return Path(os.environ.get("OUT") or "out/gpu")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--dry-run", action="store_true", help="print every stage's commands; run nothing")
    p.add_argument("--out", type=Path, help="output folder (default: $OUT, else out/gpu)")
    p.add_argument("--skip-build", action="store_true", help="use the extension already built in place")
    p.add_argument("--sizes", type=parse_size, nargs="+", metavar="WxB",
                   help=f"benchmark sizes WIDTHxBATCH (at most {MAX_SIZES}; default "
                        f"{' '.join(map(format_size, DEFAULT_SIZES))})")
    p.add_argument("--quick", action="store_true",
                   help=f"short timings and sizes {' '.join(map(format_size, QUICK_SIZES))}")
    p.add_argument("--timeout", type=float, default=DEFAULT_BUDGET,
                   help=f"seconds for the whole check (default {DEFAULT_BUDGET}); each stage also has its own cap")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="benchmark dtypes")
    # Internal: run one stage in this process (what the driver's child processes do).
    p.add_argument("--stage", choices=("env", "verify-build", "bench"), help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.sizes and len(args.sizes) > MAX_SIZES:
        p.error(f"--sizes: at most {MAX_SIZES} sizes keep the check bounded; got {len(args.sizes)}")
    if args.timeout <= 0:
        p.error(f"--timeout: expected seconds > 0, got {args.timeout}")
    # Absolute: the stages run from the repository root, wherever the check was started.
    args.out = (args.out if args.out is not None else default_out()).absolute()
    return args


# ---- stages ------------------------------------------------------------------------
@dataclass
class Stage:
    """A named step of the check: its commands run in order, into one log."""
    name: str
    title: str
    commands: list[list[str]]
    env: dict[str, str] = field(default_factory=dict)   #: set for the commands
    unset: tuple[str, ...] = ()                          #: removed from their environment
    limit: float = 300.0                                 #: seconds for all its commands
    blocking: bool = True                                #: whether its failure stops the check


@dataclass
class StageResult:
    name: str
    ok: bool
    seconds: float
    message: str
    log: Path


def python() -> str:
    """The interpreter every stage runs with: the one running this script."""
    return sys.executable or "python3"


def self_command(args, stage: str) -> list[str]:
    """This script, run as one of its internal stages with the same options."""
    cmd = [python(), str(SCRIPT), "--stage", stage, "--out", str(args.out)]
    if stage == "bench":
        cmd += ["--sizes", *map(format_size, sizes_for(args)), "--dtypes", *args.dtypes]
        cmd += ["--quick"] if args.quick else []
    return cmd


def arch_list(capability: tuple[int, int] | None) -> str:
    """TORCH_CUDA_ARCH_LIST for one GPU: its compute capability, e.g. "9.0"."""
    return "<capability of the GPU, from the env stage>" if capability is None else f"{capability[0]}.{capability[1]}"


def build_stage(capability: tuple[int, int] | None) -> Stage:
    """Editable install into this python, with CUDA ops for this GPU only. An install, not
    ``setup.py build_ext --inplace``: the package maps ``localprop.kernels`` to the top-level
    ``kernels/`` folder, which only an installed package resolves. Offline (``--no-index``,
    ``--no-deps``) and against the torch already there (``--no-build-isolation``). setup.py
    adds the CUDA ops when torch is a CUDA build and torch's CUDA_HOME (nvcc) is found;
    LOCALPROP_NO_EXTENSION would skip the extension altogether, so it is unset."""
    env = {"TORCH_CUDA_ARCH_LIST": arch_list(capability), "MAX_JOBS": str(os.cpu_count() or 1)}
    commands = [[python(), "-m", "pip", "install", "-v", "--no-index", "--no-deps", "--no-build-isolation",
                 "-e", "."]]
    return Stage("build", "build the extension with CUDA ops", commands, env, unset=("LOCALPROP_NO_EXTENSION",),
                 limit=STAGE_LIMITS["build"])


def pytest_command(out: Path) -> list[str]:
    """pytest -m gpu over tests/. pytest-timeout's --timeout when it is installed; else
    faulthandler_timeout dumps every thread's stack of a test that hangs, and the stage's
    own limit ends the run."""
    cmd = [python(), "-m", "pytest", "tests", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", "--durations=20",
           f"--junitxml={out / 'junit.xml'}", "-o", f"faulthandler_timeout={TEST_TIMEOUT}"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append(f"--timeout={TEST_TIMEOUT}")
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(max(1, min(MAX_TEST_WORKERS, os.cpu_count() or 1)))]
    return cmd


def plan(args, capability: tuple[int, int] | None = None) -> list[Stage]:
    """The stages of a run, in order. ``capability`` fills the build's arch list (None: a
    placeholder, for --dry-run and before the env stage has run)."""
    # The GPU stages must compile Triton for the device, not run its interpreter.
    gpu_unset = ("TRITON_INTERPRET",)
    stages = [Stage("env", "environment report", [self_command(args, "env")], unset=gpu_unset,
                    limit=STAGE_LIMITS["env"])]
    if not args.skip_build:
        build = build_stage(capability)
        build.commands.append(self_command(args, "verify-build"))
        stages.append(build)
    stages.append(Stage("tests", "pytest -m gpu", [pytest_command(args.out)], unset=gpu_unset,
                        limit=STAGE_LIMITS["tests"], blocking=False))
    stages.append(Stage("bench", "GPU suite", [self_command(args, "bench")], unset=gpu_unset,
                        limit=STAGE_LIMITS["bench"]))
    return stages


def describe(stage: Stage) -> str:
    """The stage as a reader would type it: environment settings, then each command."""
    lines = [f"[{stage.name}] {stage.title} (at most {stage.limit:.0f} s)"]
    settings = [f"{k}={v}" for k, v in stage.env.items()] + [f"unset {k}" for k in stage.unset]
    if settings:
        lines.append("    env: " + " ".join(settings))
    lines += ["    $ " + " ".join(cmd) for cmd in stage.commands]
    return "\n".join(lines)


def child_env(stage: Stage) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in stage.unset}
    env.update(stage.env)
    env["PYTHONUNBUFFERED"] = "1"  # so that progress arrives as it is printed
    return env


def _pump(stream, sinks) -> None:
    for line in iter(stream.readline, ""):
        for sink in sinks:
            sink.write(line)
            sink.flush()


def run_command(cmd: list[str], env: dict[str, str], log, limit: float) -> tuple[int | None, str]:
    """Run ``cmd`` from the repository root, its output to the console and to ``log``.
    (exit status, "") or (None, why) when it ran past ``limit`` seconds or could not start."""
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
    except OSError as exc:
        return None, f"could not start {cmd[0]}: {exc}"
    reader = threading.Thread(target=_pump, args=(proc.stdout, (sys.stdout, log)), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(limit, 0.01))
    except subprocess.TimeoutExpired:
        # Its own process group: a hung build or test leaves no compiler or worker behind.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=5)
        return None, f"timed out after {limit:.0f} s"
    reader.join(timeout=5)
    return rc, ""


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def run_stage(stage: Stage, logs: Path, deadline: float) -> StageResult:
    """Run ``stage``'s commands in order until one fails; never past ``deadline``."""
    log_path = logs / f"{stage.name}.log"
    start, env = time.monotonic(), child_env(stage)
    with log_path.open("w") as log:
        for cmd in stage.commands:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            limit = min(stage.limit - (time.monotonic() - start), deadline - time.monotonic())
            rc, why = run_command(cmd, env, log, limit)
            if rc != 0:
                why = why or f"exit status {rc}"
                if rc == 5 and "pytest" in cmd:
                    why += " (pytest collected no test)"
                return StageResult(stage.name, False, time.monotonic() - start, f"{' '.join(cmd)}: {why}", log_path)
    return StageResult(stage.name, True, time.monotonic() - start, "ok", log_path)


def say(text: str) -> None:
    print(text, flush=True)


def run_stages(stages: list[Stage], out: Path, budget: float,
               next_stages: Callable[[StageResult], list[Stage]] | None = None) -> list[StageResult]:
    """Run the stages in order, printing the log's tail of each that fails; stop at the
    first blocking stage that fails.
    ``next_stages(result)`` may replace the stages still to come once one has passed (the
    build's arch list is only known after the env stage)."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    deadline, results, queue = time.monotonic() + budget, [], list(stages)
    while queue:
        stage = queue.pop(0)
        say(f"\n=== stage {stage.name}: {stage.title} ===")
        result = run_stage(stage, logs, deadline)
        results.append(result)
        if not result.ok:
            say(f"\n=== stage {stage.name} FAILED after {result.seconds:.1f} s: {result.message}")
            say(f"--- last {TAIL_LINES} lines of {result.log} ---\n{tail(result.log)}\n---")
            if stage.blocking:
                break
            continue
        say(f"=== stage {stage.name} passed in {result.seconds:.1f} s")
        if next_stages is not None:
            queue = next_stages(result) or queue
    return results


def _env_info(out: Path) -> dict:
    """What the env stage recorded in env.json ({} when it wrote none)."""
    try:
        info = json.loads((out / "env.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def capability_from(out: Path) -> tuple[int, int] | None:
    """The GPU's compute capability, as the env stage recorded it."""
    try:
        return tuple(_env_info(out)["capability"])
    except (KeyError, TypeError):
        return None


def drive(args) -> int:
    """The whole check: stages in order, then the report. Exit status 0 only if all passed."""
    args.out.mkdir(parents=True, exist_ok=True)

    def after(result: StageResult) -> list[Stage]:
        if result.name != "env":
            return []
        rest = plan(args, capability_from(args.out))
        return rest[1:]

    started = time.monotonic()
    results = run_stages(plan(args)[:1], args.out, args.timeout, after)
    write_report(args.out, results)
    failed = [r for r in results if not r.ok]
    say(f"\n{'FAILED: stage ' + ', '.join(r.name for r in failed) if failed else 'all stages passed'} "
        f"({time.monotonic() - started:.0f} s); results in {args.out}")
    return 1 if failed else 0


def dry_run(args) -> int:
    say(f"gpu check plan (nothing is run); output folder {args.out}")
    for stage in plan(args):
        say(describe(stage))
    say(f"then: {args.out}/summary.md, results.csv, gpu_check.png, logs/*.log")
    return 0


# ---- results files -------------------------------------------------------------------
# results.csv is written by the bench stage with localprop.benchresults (the one schema of
# every benchmark result: case, provider, shape as key=value, metric, median/p20/p80, ratio
# to a baseline, where and with what). The driver reads it back as plain CSV, by column
# name, so that it needs no torch.
def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _number(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _fields(shape: str) -> dict[str, int]:
    """A row's ``shape`` ("width=W batch=B nodes=N") as {"width": W, "batch": B, "nodes": N}."""
    return {key: int(value) for key, value in (part.split("=", 1) for part in shape.split())}


def _size(shape: str) -> tuple[int, int]:
    """(width, batch) of a row's ``shape``."""
    fields = _fields(shape)
    return fields["width"], fields["batch"]


def _fmt(value: float | None, digits: str) -> str:
    return "—" if value is None else format(value, digits)


def speed_table(rows: list[dict]) -> list[str]:
    """Markdown rows: per dtype and size, the plain loop, each fused backend (and its
    time over the loop's) and the GEMMs alone (and their time over each backend's step)."""
    timed = [r for r in rows if r["metric"] == "median_ms"]
    median = {(r["case"], r["provider"], r["shape"], r["dtype"]): _number(r["median"]) for r in timed}
    floors = {(r["shape"], r["dtype"]): _number(r["median"]) for r in timed if r["case"] == "gemm_floor"}
    fused = sorted({r["provider"] for r in timed if r["case"] == "greedy_step"})
    keys = sorted({(r["dtype"], r["shape"]) for r in timed if r["case"] in ("torch_loop", "greedy_step")},
                  key=lambda k: (k[0], _size(k[1])))
    unchecked = sorted({r["provider"] for r in timed if r["case"] == "greedy_step_unchecked"})
    header = ["dtype", "width x batch", "plain loop ms"] + [f"{b} {c}" for b in fused for c in ("ms", "/ loop")]
    header += [f"{b} unchecked ms" for b in unchecked] + ["GEMMs ms"] + [f"GEMMs / {b}" for b in fused]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for dtype, shape in keys:
        loop, floor = median.get(("torch_loop", "pytorch", shape, dtype)), floors.get((shape, dtype))
        cells = [dtype, format_size(_size(shape)), _fmt(loop, ".3f")]
        steps = [median.get(("greedy_step", b, shape, dtype)) for b in fused]
        for step in steps:
            cells += [_fmt(step, ".3f"), _fmt(step / loop if step and loop else None, ".2f")]
        cells += [_fmt(median.get(("greedy_step_unchecked", b, shape, dtype)), ".3f") for b in unchecked]
        cells.append(_fmt(floor, ".3f"))
        cells += [_fmt(floor / step if floor and step else None, ".2f") for step in steps]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def memory_table(rows: list[dict]) -> list[str]:
    """Markdown rows: per rule, its peak step memory, resident memory and peak over bp's."""
    mem = [r for r in rows if r["case"] == "step_memory"]
    resident = {r["provider"]: _number(r["median"]) for r in mem if r["metric"] == "resident_mib"}
    lines = ["| rule | nodes | width x batch | dtype | peak step MiB | resident MiB | peak / bp |", "|---" * 7 + "|"]
    for r in (r for r in mem if r["metric"] == "peak_mib"):
        cells = [r["provider"], str(_fields(r["shape"])["nodes"]), format_size(_size(r["shape"])), r["dtype"],
                 _fmt(_number(r["median"]), ".1f"), _fmt(resident.get(r["provider"]), ".1f"),
                 _fmt(_number(r["ratio"]), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_summary(out: Path, results: list[StageResult]) -> Path:
    """summary.md from the stages' outcomes and the rows in results.csv."""
    rows = read_rows(out / "results.csv")
    mem = [r for r in rows if r["case"] == "step_memory"]
    lines = ["# GPU check", "", _machine_line(rows, _env_info(out)), "",
             "| stage | result | seconds |", "|---|---|---|"]
    lines += [f"| {r.name} | {'passed' if r.ok else 'FAILED: ' + r.message} | {r.seconds:.1f} |" for r in results]
    if any(r["metric"] == "median_ms" for r in rows):
        lines += ["", f"Greedy step of a {STEP_NODES}-node MLP, median ms (CUDA: triton.testing.do_bench); "
                  "plain loop = autograd per node + torch.optim.SGD(fused=True); unchecked = the fused step "
                  "with check_finite=False (no sync per node); GEMMs = the step's GEMMs alone "
                  "(cuBLAS), and their time over each fused step's (1 = at the GEMM roofline).", ""]
        lines += speed_table(rows)
    if mem:
        lines += ["", "Peak memory of one training step above the resident state, at the allocator "
                  "(CUDA: torch.cuda.max_memory_allocated; lp.memory.measure_step):", ""]
        lines += memory_table(mem)
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _machine_line(rows: list[dict], env: dict) -> str:
    """Where the rows were measured: from the first row, else from the env stage's record."""
    if rows:
        r = rows[0]
        return f"device {r['device']}, {r['versions']}, git {r['git_sha']}, {r['date']}"
    return (f"device {env.get('device', '?')}, torch={env.get('torch', '?')} triton={env.get('triton', '?')}, "
            f"git {env.get('git_sha', '?')}")


def write_plot(out: Path) -> Path | None:
    """gpu_check.png: step time per size for each provider, one panel per dtype."""
    rows = [r for r in read_rows(out / "results.csv")
            if r["metric"] == "median_ms" and _number(r["median"]) is not None]
    if not rows or importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    labels = sorted({(r["case"], r["provider"]) for r in rows})
    colors = {label: f"C{i}" for i, label in enumerate(labels)}  # one colour per provider in every panel
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        mine = [r for r in rows if r["dtype"] == dtype]
        shapes = sorted({r["shape"] for r in mine}, key=_size)
        for label in sorted({(r["case"], r["provider"]) for r in mine}):
            points = {r["shape"]: float(r["median"]) for r in mine if (r["case"], r["provider"]) == label}
            xs = [i for i, s in enumerate(shapes) if s in points]
            ax.plot(xs, [points[shapes[i]] for i in xs], marker="o", color=colors[label],
                    label=f"{label[0]} ({label[1]})")
        ax.set_xticks(range(len(shapes)), [format_size(_size(sh)) for sh in shapes], rotation=30)
        ax.set_yscale("log")
        ax.set_xlabel("width x batch")
        ax.set_ylabel("median ms per step")
        ax.set_title(dtype)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "gpu_check.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out: Path, results: list[StageResult]) -> None:
    """summary.md and the plot; also after a failed stage, from whatever rows exist."""
    summary = write_summary(out, results)
    try:
        plot = write_plot(out)
    except Exception as exc:  # noqa: BLE001  (a broken matplotlib must not hide the results)
        plot = None
        say(f"no plot: {type(exc).__name__}: {exc}")
    say(f"wrote {summary}" + (f" and {plot}" if plot else ""))


# ---- stage: env ----------------------------------------------------------------------
def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def version_of(package: str) -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def tool_version(tool: str) -> str:
    """The last line of ``tool --version``, or "none" when it is not on PATH."""
    if shutil.which(tool) is None:
        return "none"
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unusable ({exc})"
    lines = out.stdout.strip().splitlines()
    return lines[-1] if lines else "unknown"


def _older(version: str, than: tuple[int, ...]) -> bool:
    """Whether a dotted ``version`` is below ``than`` (False when it cannot be read)."""
    try:
        return tuple(int(v) for v in version.split(".")[:len(than)]) < than
    except ValueError:
        return False


def env_stage(args) -> int:
    """Report the machine; NO_CUDA_EXIT with a sentence when there is no CUDA device."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "triton": version_of("triton"), "setuptools": version_of("setuptools"), "ninja": tool_version("ninja"),
            "nvcc": tool_version("nvcc"), "pytest_timeout": version_of("pytest-timeout"), "cores": os.cpu_count(),
            "git_sha": git_sha()}
    for key, value in info.items():
        say(f"{key:>15}: {value}")
    if _older(info["setuptools"], (77,)):
        # pyproject.toml's SPDX `license = "..."` string needs setuptools >= 77 to be read.
        say(f"warning: setuptools {info['setuptools']} may refuse pyproject.toml's license field (needs >= 77)")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
        say(f"\nno CUDA device: torch {torch.__version__} ({build}) sees no GPU. This check needs a CUDA GPU "
            "and a CUDA build of torch; on a machine without one, run `make test` instead.")
        return NO_CUDA_EXIT
    info["device"] = torch.cuda.get_device_name(0)
    info["capability"] = list(torch.cuda.get_device_capability(0))
    props = torch.cuda.get_device_properties(0)
    info["memory_gib"] = round(props.total_memory / 2**30, 1)
    info["l2_mib"] = round(getattr(props, "L2_cache_size", 0) / 2**20, 1)
    for key in ("device", "capability", "memory_gib", "l2_mib"):
        say(f"{key:>15}: {info[key]}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "env.json").write_text(json.dumps(info, indent=2) + "\n")
    return 0


def verify_build_stage(args) -> int:
    """After the build: the extension loads and the "cuda" backend is present."""
    import torch

    from localprop.ops import backends
    reason = backends.why_unavailable("cuda", torch.device("cuda"))
    if reason is not None:
        say(f"the cuda backend is not available after the build: {reason}")
        return 1
    import localprop._C as ext
    say(f"cuda backend present: {ext.__file__}")
    return 0


# ---- stage: bench --------------------------------------------------------------------
@dataclass
class Case:
    """One timed callable: ``fn(i)`` runs a step on input copy ``i % copies``."""
    case: str
    provider: str
    fn: Callable[[int], object]


def copies_for(bytes_per_copy: float, device) -> int:
    """Input copies to rotate so that one pass over them exceeds twice the L2 (CPU: 2,
    so the rotation itself is exercised)."""
    import torch
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
    return max(1, min(8, math.ceil(2 * l2 / max(bytes_per_copy, 1))))


def optimizer(params, fused: bool):
    """SGD with momentum, the optimizer of both the fused step and the plain loop."""
    import torch
    kwargs = {"fused": True} if fused else {}
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, **kwargs)


def batches(width, batch, dtype, device):
    import torch
    copies = copies_for(batch * width * torch.tensor([], dtype=dtype).element_size(), device)
    return [(torch.randn(batch, width, dtype=dtype, device=device), torch.randint(0, CLASSES, (batch,), device=device))
            for _ in range(copies)]


def step_gemms(width: int, batch: int) -> list[tuple[int, int, int]]:
    """(m, n, k) of every GEMM a greedy step must do: per hidden node z = u Wᵀ,
    logits = h Aᵀ, g = dlogits A, dW = errᵀ u, dA = dlogitsᵀ h; the output node z and dW."""
    w, b, c = width, batch, CLASSES
    hidden = [(b, w, w), (b, c, w), (b, w, c), (w, w, b), (c, w, b)]
    return hidden * (STEP_NODES - 1) + [(b, c, w), (c, w, b)]


def fused_step_case(backend: str, width, batch, dtype, device, check_finite: bool = True) -> Case:
    """The library's greedy step of a STEP_NODES-node MLP on ``backend``. Without
    ``check_finite`` (case "greedy_step_unchecked"), the step skips the loss and parameter
    checks, each a device-to-host sync per node, which the plain loop does not make."""
    import functools

    import localprop as lp
    net = lp.mlp([width] * STEP_NODES + [CLASSES], rule="greedy", backend=backend, dtype=dtype, device=device,
                 optimizer=functools.partial(optimizer, fused=False), check_finite=check_finite)
    data = batches(width, batch, dtype, device)
    case = "greedy_step" if check_finite else "greedy_step_unchecked"
    return Case(case, backend, lambda i: net.train_step(*data[i % len(data)]))


def torch_loop_case(width, batch, dtype, device) -> Case:
    """The same greedy step as a user would write it in PyTorch: per node, autograd
    through the block and its linear head, then torch.optim SGD with fused=True."""
    import torch.nn.functional as F
    from torch import nn

    kw = {"dtype": dtype, "device": device}
    blocks = [nn.Sequential(nn.Linear(width, width, **kw), nn.ReLU()) for _ in range(STEP_NODES - 1)]
    blocks.append(nn.Linear(width, CLASSES, **kw))
    heads = [nn.Linear(width, CLASSES, **kw) for _ in range(STEP_NODES - 1)] + [nn.Identity()]
    opts = [optimizer(list(blk.parameters()) + list(hd.parameters()), fused=True) for blk, hd in zip(blocks, heads)]
    data = batches(width, batch, dtype, device)

    def step(x, y):
        for block, head, opt in zip(blocks, heads, opts):
            h = block(x)
            F.cross_entropy(head(h), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            x = h.detach()

    return Case("torch_loop", "pytorch", lambda i: step(*data[i % len(data)]))


def gemm_floor_case(width, batch, dtype, device) -> Case:
    """The step's GEMMs alone, into preallocated outputs: what cuBLAS needs at least."""
    import torch
    shapes = step_gemms(width, batch)
    size = torch.tensor([], dtype=dtype).element_size() * sum(m * k + k * n + m * n for m, n, k in shapes)

    def operands():
        return [(torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device),
                 torch.empty(m, n, dtype=dtype, device=device)) for m, n, k in shapes]

    sets = [operands() for _ in range(copies_for(size, device))]

    def run(i):
        for a, b, out in sets[i % len(sets)]:
            torch.mm(a, b, out=out)

    return Case("gemm_floor", "cublas" if device.type == "cuda" else "pytorch", run)


def timer(device, quick: bool) -> Callable[[Callable[[], object]], tuple[float, float, float]]:
    """(median, p20, p80) ms of a callable: triton.testing.do_bench on CUDA, perf_counter
    on CPU (the CPU rehearsal of this stage)."""
    if device.type == "cuda":
        from triton.testing import do_bench
        warmup, rep = (10, 40) if quick else (25, 100)
        return lambda fn: tuple(do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8]))

    def cpu(fn):
        fn()
        times = []
        for _ in range(3 if quick else 10):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
        return pick(0.5), pick(0.2), pick(0.8)
    return cpu


def measure(case: Case, time_fn) -> tuple[float, float, float]:
    """Time ``case`` over rotating input copies; its first run (compilation) is untimed."""
    calls = iter(range(1 << 62))
    case.fn(next(calls))
    return time_fn(lambda: case.fn(next(calls)))


def step_shape(width: int, batch: int, nodes: int = STEP_NODES) -> str:
    """A row's ``shape``: the MLP's width, batch and nodes as key=value."""
    return f"width={width} batch={batch} nodes={nodes}"


def result(env: dict, case: str, provider: str, shape: str, dtype: str, metric: str, value: float,
           quantiles: tuple[float, float] | None = None, ratio: float | None = None, baseline: str = ""):
    """One row of localprop.benchresults' schema; ``env`` is its where-and-with-what columns."""
    from localprop.benchresults import Result
    p20, p80 = quantiles or (None, None)
    return Result(case=case, provider=provider, metric=metric, median=value, shape=shape, dtype=dtype, p20=p20,
                  p80=p80, ratio=ratio, baseline=baseline, **env)


def bench_size(width, batch, dtype_name, backends_, device, time_fn, env) -> tuple[list, list[str]]:
    """Rows for one (width, batch, dtype): the median ms of the plain loop, of each
    backend's fused step and of the GEMMs alone, each with its ratio to the loop. Errors of
    a case are returned, not raised, so that the other cases still run."""
    import functools

    import torch
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    size, shape, rows, errors, loop = format_size((width, batch)), step_shape(width, batch), [], [], None
    cases = [("torch_loop", torch_loop_case)]
    cases += [(f"greedy_step {b}", functools.partial(fused_step_case, b)) for b in backends_]
    cases += [(f"greedy_step_unchecked {b}", functools.partial(fused_step_case, b, check_finite=False))
              for b in backends_]
    cases += [("gemm_floor", gemm_floor_case)]
    for label, make in cases:
        torch.manual_seed(0)
        try:
            case = make(width, batch, dtype, device)
            timing = measure(case, time_fn)
        except Exception as exc:  # noqa: BLE001  (a broken case is reported, the rest still run)
            first = str(exc).splitlines()[0] if str(exc) else ""
            errors.append(f"{dtype_name} {size} {label}: {type(exc).__name__}: {first}")
            say("  error: " + errors[-1])
            continue
        loop = timing[0] if case.case == "torch_loop" else loop
        ratio = timing[0] / loop if loop else None
        rows.append(result(env, case.case, case.provider, shape, dtype_name, "median_ms", timing[0], timing[1:],
                           ratio, "pytorch"))
        say(f"  {dtype_name} {size:>11} {case.case:<12} {case.provider:<8} {timing[0]:10.3f} ms"
            + (f"  x{ratio:.2f} of the loop" if ratio is not None else ""))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next case's sizes should not be squeezed by this one's
    return rows, errors


def bench_memory(width, batch, device, env) -> list:
    """Peak step memory (with its ratio to bp's) and resident memory, MiB, of a
    MEMORY_NODES-node MLP under greedy and bp (lp.memory)."""
    import functools

    import torch

    import localprop as lp
    x = torch.randn(batch, width, device=device)
    y = torch.randint(0, CLASSES, (batch,), device=device)

    def build(rule):
        torch.manual_seed(0)
        return lp.mlp([width] * MEMORY_NODES + [CLASSES], rule=rule, device=device,
                      optimizer=functools.partial(optimizer, fused=False))

    measured = lp.memory.compare(build, ["bp", "greedy"], x, y)
    bp = measured[0].peak_bytes or 1
    rows, shape = [], step_shape(width, batch, MEMORY_NODES)
    for m in measured:
        rows.append(result(env, "step_memory", m.rule, shape, "fp32", "peak_mib", m.peak_bytes / 2**20,
                           ratio=m.peak_bytes / bp, baseline="bp"))
        rows.append(result(env, "step_memory", m.rule, shape, "fp32", "resident_mib", m.resident_bytes / 2**20))
        say(f"  memory {m.rule:<7} {MEMORY_NODES} nodes {width}x{batch}: peak {m.peak_bytes / 2**20:.1f} MiB "
            f"({m.peak_bytes / bp:.3f} of bp)")
    return rows


def bench_stage(args) -> int:
    """The GPU suite (or, with --device cpu, its rehearsal); rows are appended as they come,
    so a run stopped by its time limit keeps what it measured. Non-zero if any case failed."""
    import torch

    from localprop import benchresults
    from localprop.ops import backends
    device = torch.device(args.device)
    sizes, env, errors = sizes_for(args), benchresults.environment(device), []
    missing = {b: backends.why_unavailable(b, device) for b in args.backends}
    for name, reason in missing.items():
        if reason is not None:
            errors.append(f"backend {name} is not available: {reason}")
            say("  error: " + errors[-1])
    present = [b for b, reason in missing.items() if reason is None]
    time_fn = timer(device, args.quick)
    results = args.out / "results.csv"
    results.unlink(missing_ok=True)  # one run's rows per folder
    # Memory first: it is short, and a run cut off by its time limit should still have it.
    width, batch = memory_size(sizes)
    try:
        mem = bench_memory(width, batch, device, env)
    except Exception as exc:  # noqa: BLE001  (reported as the stage's failure below)
        errors.append(f"memory {width}x{batch}: {type(exc).__name__}: {exc}")
        mem = []
    benchresults.write(results, mem)
    for dtype_name in args.dtypes:
        for width, batch in sizes:
            rows, errs = bench_size(width, batch, dtype_name, present, device, time_fn, env)
            benchresults.write(results, rows)
            errors += errs
    if errors:
        say(f"\n{len(errors)} case(s) failed:\n  " + "\n  ".join(errors))
        return 1
    return 0


# ---- entry point ---------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage == "env":
        return env_stage(args)
    if args.stage == "verify-build":
        return verify_build_stage(args)
    if args.stage == "bench":
        args.out.mkdir(parents=True, exist_ok=True)
        return bench_stage(args)
    return dry_run(args) if args.dry_run else drive(args)


if __name__ == "__main__":
    sys.exit(main())
