"""``localprop bench``: time each fused op per backend, the whole fused greedy step of a
LocalSequential MLP, the plain PyTorch loop it replaces (autograd per node + torch.optim
foreach) and the GEMM floor (the step's unavoidable GEMMs alone). Prints a table and
appends rows to a CSV (default bench/results/kernels.csv).

CUDA timings are triton.testing.do_bench medians (quantiles 0.5, 0.2, 0.8) with inputs
rotated among copies that together exceed the L2 cache; CPU timings are perf_counter
medians after a warm-up.
"""
from __future__ import annotations

import csv
import datetime
import functools
import importlib.metadata
import itertools
import math
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import localprop as lp
from localprop import ops
from localprop.ops import backends

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
CLASSES = 10  #: classes of every head and of the MLP's logits
FIELDS = ("date", "op", "backend", "width", "batch", "dtype", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps",
          "device", "torch", "triton", "git_sha")
OPTIMIZER = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)
ADAM = functools.partial(torch.optim.Adam, lr=1e-3)


@dataclass
class Case:
    """One timed callable: ``fn(i)`` runs once on input copy ``i % copies``."""
    op: str
    backend: str
    fn: Callable[[int], object]
    flops: float
    bytes: float = 0.0  #: memory traffic for GB/s, 0 where it is not meaningful


# ---- timing ------------------------------------------------------------------------
def time_cuda(fn: Callable[[], object], quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) in ms by triton.testing.do_bench."""
    from triton.testing import do_bench
    warmup, rep = (5, 20) if quick else (25, 100)
    return tuple(do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8]))


def time_cpu(fn: Callable[[], object], quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) in ms of perf_counter timings after a warm-up."""
    budget, min_runs = (0.05, 3) if quick else (1.0, 10)
    for _ in range(2):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def copies_for(bytes_per_call: float, device: torch.device) -> int:
    """How many input copies to rotate so that one pass over them exceeds twice the L2."""
    if device.type != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(8, math.ceil(2 * l2 / max(bytes_per_call, 1))))


# ---- cases -------------------------------------------------------------------------
def rotating(make: Callable[[], tuple], call: Callable, copies: int) -> Callable[[int], object]:
    inputs = [make() for _ in range(copies)]
    return lambda i: call(*inputs[i % copies])


class OpInputs:
    """Fresh random inputs of the fused ops for a square [width, width] ReLU node with a
    CLASSES-way head; each call makes a new copy."""

    def __init__(self, width: int, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        self.n, self.b, self.kw = width, batch, {"dtype": dtype, "device": device}

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, **self.kw) * scale

    def layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.randn(self.n, self.n, scale=self.n ** -0.5), self.randn(self.n)

    def transform(self) -> tuple:
        return (self.randn(self.b, self.n), *self.layer())

    def head_error(self) -> tuple:
        h, aux = ops.transform_ref(*self.transform(), "relu")
        y = torch.randint(0, CLASSES, (self.b,), device=self.kw["device"])
        return h, aux, self.randn(CLASSES, self.n, scale=self.n ** -0.5), self.randn(CLASSES), y

    def update(self, factory) -> tuple:
        w, bias = (nn.Parameter(t) for t in self.layer())
        return factory([w, bias]), w, bias, self.randn(self.b, self.n, scale=self.b ** -0.5), self.randn(self.b, self.n)


def op_traffic(op: str, width: int, batch: int, dtype: torch.dtype) -> float:
    """Bytes an op must move at least: its inputs and outputs once (updates: read and
    write the parameter and each state tensor)."""
    es, n, b, c = torch.tensor([], dtype=dtype).element_size(), width, batch, CLASSES
    mask = b * math.ceil(n / 8)
    return {"transform": es * (2 * b * n + n * n) + mask, "head_error": es * (2 * b * n + c * n + 2 * b * c) + mask,
            "sgd_update": es * (2 * b * n + 4 * n * n), "adam_update": es * (2 * b * n + 6 * n * n)}[op]


def op_cases(backend: str, width: int, batch: int, dtype: torch.dtype, device: torch.device) -> list[Case]:
    """The four fused ops on ``backend``, each with its FLOPs and least memory traffic."""
    x, gemm = OpInputs(width, batch, dtype, device), 2.0 * batch * width * width

    def update(opt, w, bias, err, inp):
        ops.update(opt, [ops.LinearGrad(w, bias, err, inp)], backend=backend)

    specs = {"transform": (x.transform, lambda u, w, b: ops.transform(u, w, b, "relu", backend), gemm),
             "head_error": (x.head_error, lambda *a: ops.head_error(*a, "relu", backend=backend),
                            4.0 * batch * width * CLASSES),
             "sgd_update": (functools.partial(x.update, OPTIMIZER), update, gemm),
             "adam_update": (functools.partial(x.update, ADAM), update, gemm)}
    cases = []
    for op, (make, call, flops) in specs.items():
        traffic = op_traffic(op, width, batch, dtype)
        cases.append(Case(op, backend, rotating(make, call, copies_for(traffic, device)), flops, traffic))
    return cases


def step_gemms(width: int, batch: int) -> list[tuple[int, int, int]]:
    """(m, n, k) of every GEMM a greedy step of mlp() must do: per hidden node z = u Wᵀ,
    logits = h Aᵀ, g = dlogits A, dW = errᵀ u, dA = dlogitsᵀ h; the last node z and dW."""
    w, b, c = width, batch, CLASSES
    hidden = [(b, w, w), (b, c, w), (b, w, c), (w, w, b), (c, w, b)]
    return hidden * 2 + [(b, c, w), (c, w, b)]


def mlp(width: int, dtype: torch.dtype, device: torch.device, backend: str) -> lp.LocalSequential:
    """The benchmarked network: width -> width -> width -> CLASSES, ReLU, greedy with heads."""
    return lp.mlp([width] * 3 + [CLASSES], dtype=dtype, device=device, rule="greedy", optimizer=OPTIMIZER,
                  backend=backend)


def batches(width, batch, dtype, device, copies):
    return [(torch.randn(batch, width, dtype=dtype, device=device), torch.randint(0, CLASSES, (batch,), device=device))
            for _ in range(copies)]


def step_case(backend: str, width: int, batch: int, dtype: torch.dtype, device: torch.device) -> Case:
    net = mlp(width, dtype, device, backend)
    data = batches(width, batch, dtype, device, copies_for(batch * width * 4, device))
    flops = sum(2.0 * m * n * k for m, n, k in step_gemms(width, batch))
    return Case("greedy_step", backend, lambda i: net.train_step(*data[i % len(data)]), flops)


def torch_loop_case(width: int, batch: int, dtype: torch.dtype, device: torch.device) -> Case:
    """The same greedy step in plain PyTorch: autograd per node, torch.optim foreach."""
    kw = {"dtype": dtype, "device": device}
    blocks = [nn.Sequential(nn.Linear(width, width, **kw), nn.ReLU()) for _ in range(2)]
    blocks.append(nn.Linear(width, CLASSES, **kw))
    heads = [nn.Linear(width, CLASSES, **kw) for _ in range(2)] + [nn.Identity()]
    opts = [OPTIMIZER(list(blk.parameters()) + list(hd.parameters()), foreach=True) for blk, hd in zip(blocks, heads)]
    data = batches(width, batch, dtype, device, copies_for(batch * width * 4, device))

    def step(x, y):
        for block, head, opt in zip(blocks, heads, opts):
            h = block(x)
            F.cross_entropy(head(h), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            x = h.detach()

    flops = sum(2.0 * m * n * k for m, n, k in step_gemms(width, batch))
    return Case("torch_loop", "pytorch", lambda i: step(*data[i % len(data)]), flops)


def gemm_floor_case(width: int, batch: int, dtype: torch.dtype, device: torch.device) -> Case:
    """The greedy step's GEMMs alone, into preallocated outputs."""
    shapes = step_gemms(width, batch)
    es = torch.tensor([], dtype=dtype).element_size()
    size = es * sum(m * k + k * n + m * n for m, n, k in shapes)

    def make():  # one argument: the list of (a, b, out) of every GEMM
        operands = [(torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device),
                     torch.empty(m, n, dtype=dtype, device=device)) for m, n, k in shapes]
        return (operands,)

    def run_all(operands):
        for a, b, out in operands:
            torch.mm(a, b, out=out)

    flops = sum(2.0 * m * n * k for m, n, k in shapes)
    return Case("gemm_floor", "pytorch", rotating(make, run_all, copies_for(size, device)), flops)


# ---- running -----------------------------------------------------------------------
def skip_reason(name: str, device: torch.device) -> str | None:
    if name == "triton" and device.type == "cpu":
        return "triton on CPU runs interpreted (TRITON_INTERPRET=1), for correctness only"
    return backends.why_unavailable(name, device)


def measure(case: Case, timer, quick: bool):
    """(median, p20, p80) ms of ``case``, or the error that its first run raised."""
    calls = itertools.count()
    try:
        case.fn(next(calls))
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        return str(exc).splitlines()[0]
    return timer(lambda: case.fn(next(calls)), quick)


def cases_for(width, batch, dtype, device, present):
    for backend in present:
        yield from op_cases(backend, width, batch, dtype, device)
        yield step_case(backend, width, batch, dtype, device)
    yield torch_loop_case(width, batch, dtype, device)
    yield gemm_floor_case(width, batch, dtype, device)


def environment(device: torch.device) -> dict[str, str]:
    """The CSV's per-run columns: date, device name, versions, git sha."""
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "none"
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "git_sha": git_sha()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def append_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def row_for(case: Case, timing, width, batch, dtype_name, env) -> dict:
    median, p20, p80 = timing
    return {**env, "op": case.op, "backend": case.backend, "width": width, "batch": batch, "dtype": dtype_name,
            "median_ms": f"{median:.4f}", "p20_ms": f"{p20:.4f}", "p80_ms": f"{p80:.4f}",
            "tflops": f"{case.flops / median / 1e9:.4g}",
            "gbps": f"{case.bytes / median / 1e6:.4g}" if case.bytes else ""}


HEADER = f"{'op':<12} {'backend':<10} {'width':>6} {'batch':>6} {'dtype':<5} {'median ms':>10} " \
         f"{'p20 ms':>9} {'p80 ms':>9} {'TFLOP/s':>8} {'GB/s':>8}"


def print_row(r: dict) -> None:
    print(f"{r['op']:<12} {r['backend']:<10} {r['width']:>6} {r['batch']:>6} {r['dtype']:<5} {r['median_ms']:>10} "
          f"{r['p20_ms']:>9} {r['p80_ms']:>9} {r['tflops']:>8} {r['gbps']:>8}", flush=True)


def settings(args, device: torch.device) -> tuple[list[int], list[int], list[str]]:
    """Widths, batches and dtypes: the arguments, else --quick's, else the device's defaults."""
    gpu = device.type == "cuda"
    if args.quick:
        defaults = ([64], [32], ["fp32"])
    elif gpu:
        defaults = ([512, 1024, 2048, 4096, 8192], [256, 1024, 4096, 8192], ["fp32", "bf16"])
    else:
        defaults = ([256, 512, 1024], [256], ["fp32"])
    return args.widths or defaults[0], args.batches or defaults[1], args.dtypes or defaults[2]


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    widths, batch_sizes, dtype_names = settings(args, device)
    timer = time_cuda if device.type == "cuda" else time_cpu
    present = []
    for name in backends.NAMES:
        reason = skip_reason(name, device)
        if reason is None:
            present.append(name)
        else:
            print(f"skipped backend {name}: {reason}")
    env = environment(device)
    print(f"device {env['device']}, torch {env['torch']}, triton {env['triton']}, git {env['git_sha']}\n{HEADER}")
    rows = []
    for dtype_name, width, batch in itertools.product(dtype_names, widths, batch_sizes):
        torch.manual_seed(0)
        for case in cases_for(width, batch, DTYPES[dtype_name], device, present):
            timing = measure(case, timer, args.quick)
            if isinstance(timing, str):
                print(f"{case.op:<12} {case.backend:<10} {width:>6} {batch:>6} {dtype_name:<5} skipped: {timing}")
                continue
            rows.append(row_for(case, timing, width, batch, dtype_name, env))
            print_row(rows[-1])
    append_csv(Path(args.out), rows)
    print(f"{len(rows)} rows appended to {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="time the fused ops per backend against plain PyTorch and the GEMM floor")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--widths", type=int, nargs="+", help="node widths (GPU: 512..8192; CPU: 256 512 1024)")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (GPU: 256..8192; CPU: 256)")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), help="GPU: fp32 bf16; CPU: fp32")
    p.add_argument("--quick", action="store_true", help="one tiny size and short timings (a smoke run)")
    p.add_argument("--out", default="bench/results/kernels.csv", help="CSV to append rows to (created with a header)")
    p.set_defaults(func=run)
