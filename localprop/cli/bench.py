"""``localprop bench``: paired timings of the fused ops and of one greedy training step.

Each case runs its providers in one process, alternated round by round (the order rotated
each round, so that none always runs first), after a warm-up, each on input copies rotated
so that one pass over them exceeds twice the cache (CUDA: L2; CPU: the largest cache):

- the fused ops (transform, head_error, sgd_update, adam_update) per backend present;
- a greedy step of a DEPTH-node MLP: LocalSequential on each backend, the plain PyTorch
  loop it replaces (per node autograd forward and backward, torch.optim foreach SGD), a
  DGL-style autograd loop (every node's input detached, the local losses summed, one
  backward, one optimizer step), localprop's bp and bp+checkpoint on the same layers, and
  the step's GEMMs alone (the floor);
- with ``--model pkg.module:factory``: one training step of the user's model per rule,
  localized by :func:`localprop.localize`, with its peak step memory (table, JSON, PNG).

Per provider: median and p20/p80 of the per-round times, and the ratio to a baseline as
the median and p20/p80 of the round-by-round ratios (paired, so load that drifts between
rounds cancels). The command measures its own spread and warns when it is too large to
separate the providers, saying why. Rows go to a CSV in the results schema
(:mod:`localprop.benchresults`).
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import localprop as lp
from localprop import benchresults, memory, ops
from localprop.ops import backends

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
CLASSES = 10  #: classes of every head and of the MLP's logits
DEPTH = 4  #: nodes of the benchmarked MLP, as bench/fused_cpu.py's
SGD = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, foreach=True)
ADAM = functools.partial(torch.optim.Adam, lr=1e-3)
#: relative (p80 - p20) / median above which two providers closer than that cannot be told
#: apart: on a quiet 2-core machine paired rounds of the greedy step stay near 3%
NOISE_LIMIT = 0.10
MIN_ROUNDS = 10  #: fewer rounds than this make p20/p80 rest on one or two samples each
LOAD_MARGIN = 0.5  #: load average above the cores this run leaves idle that counts as competing work
FREQ_CHANGE = 0.05  #: relative change of the CPU clock between start and end that counts as a change
ROUND_SECONDS = 0.005  #: a provider's calls per round are as many as fill this (timer resolution, jitter)
MAX_COPIES = 8  #: at most this many input copies are rotated (memory)


@dataclass
class Case:
    """One comparison: ``providers[name](i)`` runs once on input copy ``i``; the ratios are
    to ``baseline``."""
    name: str
    shape: str
    dtype: str
    providers: dict[str, Callable[[int], object]]
    baseline: str


# ---- machine -----------------------------------------------------------------------
def physical_cores() -> int:
    """Cores (not hyper-threads) this process may run on: distinct (physical id, core id)
    pairs of /proc/cpuinfo among its allowed CPUs, else the CPU count."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    try:
        blocks = Path("/proc/cpuinfo").read_text().strip().split("\n\n")
    except OSError:
        return len(allowed)
    cores = set()
    for block in blocks:
        info = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        if int(info.get("processor", -1)) in allowed:
            cores.add((info.get("physical id"), info.get("core id", info.get("processor"))))
    return len(cores) or len(allowed)


def cpu_mhz() -> float | None:
    """The mean current clock of the CPUs in MHz (cpufreq, else /proc/cpuinfo), None where
    neither says (then clock changes cannot be detected)."""
    freqs = []
    for path in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_cur_freq"):
        try:
            freqs.append(int(path.read_text()) / 1e3)
        except (OSError, ValueError):
            pass
    if not freqs:
        try:
            freqs = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("cpu MHz")]
        except (OSError, ValueError):
            return None
    return sum(freqs) / len(freqs) if freqs else None


def load_average() -> float | None:
    """The 1-minute load average, None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def cache_bytes(device: torch.device) -> int:
    """CUDA: the L2; CPU: the largest cache sysfs lists (2 MiB if it lists none)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=2 * 2**20)


def copies_for(bytes_per_call: float, device: torch.device) -> int:
    """How many input copies to rotate so that one pass over them exceeds twice the cache."""
    return max(1, min(MAX_COPIES, math.ceil(2 * cache_bytes(device) / max(bytes_per_call, 1))))


# ---- statistics and noise -------------------------------------------------------------
def summarize(case: Case, times: dict[str, list[float]], env: dict) -> list[benchresults.Result]:
    """One result row per provider: median/p20/p80 ms of its per-round times and the
    paired ratio to the baseline's times of the same rounds."""
    rows = []
    for name, samples in times.items():
        median, p20, p80 = benchresults.quantiles(samples)
        ratio = benchresults.paired_ratio(samples, times[case.baseline]) if case.baseline in times else (None,) * 3
        rows.append(benchresults.Result(case=case.name, provider=name, metric="median_ms", median=median, p20=p20,
                                        p80=p80, shape=case.shape, dtype=case.dtype, ratio=ratio[0],
                                        ratio_p20=ratio[1], ratio_p80=ratio[2],
                                        baseline=case.baseline if ratio[0] is not None else "", **env))
    return rows


def noise_warnings(times: dict[str, list[float]], rounds: int, load: float | None, cores: int, threads: int,
                   mhz: tuple[float | None, float | None] = (None, None), limit: float = NOISE_LIMIT) -> list[str]:
    """Warnings about one case's timings (``times``: provider -> per-round ms): the spread
    above ``limit``, with its likely causes (load average ``load`` above what ``threads`` of
    ``cores`` leave idle, fewer than MIN_ROUNDS rounds, the clock ``mhz`` (start, end)
    changing), and competing load even where the spread stayed small."""
    spread, worst = max((benchresults.relative_spread(ts), name) for name, ts in times.items())
    busy = load is not None and load > cores - threads + LOAD_MARGIN
    why = []
    if busy:
        fewer = "; fewer threads (--threads 1) suffer less from it" if threads > 1 else ""
        why.append(f"load average {load:.2f} on {cores} cores with {threads} thread{'s' * (threads != 1)} of this "
                   f"run: other work competes for the cores{fewer}")
    if rounds < MIN_ROUNDS:
        why.append(f"only {rounds} rounds (use --rounds {MIN_ROUNDS} or more)")
    start, end = mhz
    if start and end and abs(end - start) / start > FREQ_CHANGE:
        why.append(f"the CPU clock changed from {start:.0f} to {end:.0f} MHz")
    if spread > limit:
        cause = "; ".join(why) or "no cause found (a process may have run briefly): rerun, or raise --rounds"
        return [f"warning: run-to-run spread {spread:.0%} ({worst}) exceeds {limit:.0%}: providers closer than "
                f"that cannot be told apart ({cause})"]
    if busy:
        return [f"warning: {why[0]}; the figures may shift from run to run"]
    return []


# ---- timing --------------------------------------------------------------------------
def calls_per_round(fn: Callable[[], object], sync: Callable[[], None]) -> int:
    """Warm ``fn`` up (3 calls) and return how many calls fill ROUND_SECONDS."""
    fn()
    t0 = time.perf_counter()
    for _ in range(2):
        fn()
    sync()
    return max(1, math.ceil(ROUND_SECONDS / max((time.perf_counter() - t0) / 2, 1e-9)))


def alternate(providers: dict[str, Callable[[int], object]], rounds: int,
              sync: Callable[[], None]) -> dict[str, list[float]]:
    """Per-round ms per call of each provider, alternated: round r runs the providers in
    an order rotated by r, each for its calls per round, on the next input copies."""
    counters = {name: itertools.count() for name in providers}
    calls = {name: (lambda n=name: providers[n](next(counters[n]))) for name in providers}
    per_round = {name: calls_per_round(fn, sync) for name, fn in calls.items()}
    names, times = list(providers), {name: [] for name in providers}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, n = calls[name], per_round[name]
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / n * 1e3)
    return times


def runnable(providers: dict[str, Callable[[int], object]]) -> tuple[dict, dict[str, str]]:
    """The providers whose first call succeeds, and the others with the first line of their error."""
    ok, failed = {}, {}
    for name, fn in providers.items():
        try:
            fn(0)
            ok[name] = fn
        except (RuntimeError, TypeError, ValueError) as exc:  # NotImplementedError is a RuntimeError
            failed[name] = str(exc).splitlines()[0]
    return ok, failed


# ---- cases: the fused ops ---------------------------------------------------------------
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


def rotating(make: Callable[[], tuple], call: Callable, copies: int) -> Callable[[int], object]:
    inputs = [make() for _ in range(copies)]
    return lambda i: call(*inputs[i % copies])


def op_cases(present: list[str], width: int, batch: int, dtype_name: str, device: torch.device) -> list[Case]:
    """The four fused ops, each a case whose providers are the backends present."""
    x = OpInputs(width, batch, DTYPES[dtype_name], device)
    copies = copies_for(x.randn(1).element_size() * (2 * batch * width + width * width), device)

    def update(backend, opt, w, bias, err, inp):
        ops.update(opt, [ops.LinearGrad(w, bias, err, inp)], backend=backend)

    specs = {"transform": (x.transform, lambda b: lambda u, w, bias: ops.transform(u, w, bias, "relu", b)),
             "head_error": (x.head_error, lambda b: lambda *a: ops.head_error(*a, "relu", backend=b)),
             "sgd_update": (functools.partial(x.update, SGD), lambda b: functools.partial(update, b)),
             "adam_update": (functools.partial(x.update, ADAM), lambda b: functools.partial(update, b))}
    shape = f"width={width} batch={batch}"
    return [Case(op, shape, dtype_name, {b: rotating(make, call(b), copies) for b in present}, "reference")
            for op, (make, call) in specs.items()]


# ---- cases: the greedy step ---------------------------------------------------------------
def batches(width: int, batch: int, dtype: torch.dtype, device: torch.device) -> list[tuple]:
    """Input copies to rotate: x [batch, width] of ``dtype``, y [batch] int64 labels."""
    copies = copies_for(batch * width * torch.tensor([], dtype=dtype).element_size(), device)
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, width, generator=g).to(device, dtype),
             torch.randint(0, CLASSES, (batch,), generator=g).to(device)) for _ in range(copies)]


def stepping(step: Callable, data: list) -> Callable[[int], object]:
    return lambda i: step(*data[i % len(data)])


def fused_net(width: int, dtype, device, backend: str, rule: str = "greedy") -> lp.LocalSequential:
    """The benchmarked MLP: DEPTH nodes width -> ... -> CLASSES, ReLU, check_finite off."""
    torch.manual_seed(0)
    return lp.mlp([width] * DEPTH + [CLASSES], dtype=dtype, device=device, rule=rule, optimizer=SGD,
                  backend=backend, check_finite=False)


def torch_layers(width: int, dtype, device) -> tuple[list[nn.Module], list[nn.Module | None]]:
    """The MLP's layers as nn.Linear blocks (ReLU but the last) and heads (none on the last)."""
    torch.manual_seed(0)
    kw = {"dtype": dtype, "device": device}
    blocks = [nn.Sequential(nn.Linear(width, width, **kw), nn.ReLU()) for _ in range(DEPTH - 1)]
    blocks.append(nn.Linear(width, CLASSES, **kw))
    return blocks, [nn.Linear(width, CLASSES, **kw) for _ in range(DEPTH - 1)] + [None]


def plain_loop(width: int, dtype, device) -> Callable:
    """The greedy step as a user writes it: per node forward, backward, step, detach."""
    blocks, heads = torch_layers(width, dtype, device)
    opts = [SGD([*b.parameters(), *(h.parameters() if h else ())]) for b, h in zip(blocks, heads)]

    def step(x, y):
        for block, head, opt in zip(blocks, heads, opts):
            h = block(x)
            F.cross_entropy(head(h) if head else h, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            x = h.detach()
    return step


def dgl_loop(width: int, dtype, device) -> Callable:
    """The greedy step as DGL-style code writes it: every node's input detached, the local
    losses summed, one backward and one optimizer step over all parameters."""
    blocks, heads = torch_layers(width, dtype, device)
    params = [p for m in blocks + heads if m is not None for p in m.parameters()]
    opt = SGD(params)

    def step(x, y):
        total = 0
        for block, head in zip(blocks, heads):
            h = block(x)
            total = total + F.cross_entropy(head(h) if head else h, y)
            x = h.detach()
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def gemm_floor(width: int, batch: int, dtype, device) -> Callable[[int], object]:
    """The step's unavoidable GEMMs alone into preallocated outputs: per hidden node
    z = u Wᵀ, logits = h Aᵀ, g = dlogits A, dW = errᵀ u, dA = dlogitsᵀ h; the last node's
    z and dW."""
    w, b, c = width, batch, CLASSES
    shapes = [(b, w, w), (b, c, w), (b, w, c), (w, w, b), (c, w, b)] * (DEPTH - 1) + [(b, c, w), (c, w, b)]
    kw = {"dtype": dtype, "device": device}

    def make():  # one argument: the (a, b, out) of every GEMM
        return ([(torch.randn(m, k, **kw), torch.randn(k, n, **kw), torch.empty(m, n, **kw)) for m, n, k in shapes],)

    def run_all(operands):
        for a, bb, out in operands:
            torch.mm(a, bb, out=out)
    size = torch.tensor([], dtype=dtype).element_size() * sum(m * k + k * n + m * n for m, n, k in shapes)
    return rotating(make, run_all, copies_for(size, device))


def step_case(present: list[str], width: int, batch: int, dtype_name: str, device: torch.device,
              baseline: str) -> Case:
    """The greedy step, every provider on the same MLP and the same rotated batches."""
    dtype, data = DTYPES[dtype_name], batches(width, batch, DTYPES[dtype_name], device)
    fastest = backends.resolve("auto", device)
    providers = {f"localprop:{b}": stepping(fused_net(width, dtype, device, b).train_step, data) for b in present}
    providers |= {"plain": stepping(plain_loop(width, dtype, device), data),
                  "dgl": stepping(dgl_loop(width, dtype, device), data),
                  "bp": stepping(fused_net(width, dtype, device, fastest, "bp").train_step, data),
                  "bp+checkpoint": stepping(fused_net(width, dtype, device, fastest, "bp+checkpoint").train_step, data),
                  "gemm_floor": gemm_floor(width, batch, dtype, device)}
    return Case("greedy_step", f"width={width} depth={DEPTH} batch={batch}", dtype_name, providers, baseline)


# ---- running ------------------------------------------------------------------------------
def present_backends(requested: list[str] | None, device: torch.device) -> list[str]:
    """The backends to time: ``requested`` (BackendUnavailable for one that is absent), else
    every one present (triton on CPU only under TRITON_INTERPRET=1, which times the interpreter)."""
    if requested:
        return [ops.resolve(name, device) for name in requested]
    present = [n for n in backends.NAMES if backends.why_unavailable(n, device) is None
               and not (n == "triton" and device.type == "cpu")]
    for name in sorted(set(backends.NAMES) - set(present)):
        print(f"skipped backend {name}: {backends.why_unavailable(name, device) or 'interpreted on CPU'}")
    return present


def settings(args, device: torch.device) -> tuple[list[int], list[int], list[str], int]:
    """Widths, batches, dtypes and rounds: the arguments, else --quick's, else the device's."""
    if args.quick:
        defaults = ([64], [32], ["fp32"], 5)
    elif device.type == "cuda":
        defaults = ([1024, 4096], [1024, 4096], ["fp32", "bf16"], 20)
    else:
        defaults = ([256, 512, 1024], [256], ["fp32"], 15)
    return args.widths or defaults[0], args.batches or defaults[1], args.dtypes or defaults[2], \
        args.rounds or defaults[3]


def set_threads(requested: int | None) -> tuple[int, int]:
    """Pin torch's intra-op threads: ``requested``, else the physical cores; (threads, cores)."""
    cores = physical_cores()
    threads = cores if requested is None else requested
    if threads < 1:
        raise ValueError(f"--threads: expected an integer >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads, cores


def sync_for(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def print_case(case: Case, rows: list[benchresults.Result], failed: dict[str, str]) -> None:
    print(f"\n{case.name}  {case.shape}  {case.dtype}  (ratio to {case.baseline})")
    print(f"  {'provider':<22} {'median ms':>10} {'p20':>9} {'p80':>9}   {'ratio [p20, p80]':<22}")
    for r in rows:
        ratio = f"{r.ratio:.3f} [{r.ratio_p20:.3f}, {r.ratio_p80:.3f}]" if r.ratio is not None else "-"
        print(f"  {r.provider:<22} {r.median:>10.4f} {r.p20:>9.4f} {r.p80:>9.4f}   {ratio:<22}")
    for name, why in failed.items():
        print(f"  {name:<22} skipped: {why}")


def check_baseline(case: Case) -> None:
    if case.baseline not in case.providers:
        raise ValueError(f"baseline {case.baseline!r} is not a provider of {case.name}; expected one of "
                         f"{', '.join(case.providers)}")


def bench_case(case: Case, rounds: int, device: torch.device, machine: dict, env: dict) -> list[benchresults.Result]:
    """Time one case, print its table and its noise warnings; its result rows."""
    check_baseline(case)
    providers, failed = runnable(case.providers)
    if not providers:
        print_case(case, [], failed)
        return []
    mhz0 = cpu_mhz() if device.type == "cpu" else None
    times = alternate(providers, rounds, sync_for(device))
    mhz1 = cpu_mhz() if device.type == "cpu" else None
    rows = summarize(case, times, env)
    print_case(case, rows, failed)
    for line in noise_warnings(times, rounds, machine["load"], machine["cores"], machine["threads"], (mhz0, mhz1)):
        print(f"  {line}")
    return rows


def run_cases(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads, cores = set_threads(args.threads)
    widths, batch_sizes, dtype_names, rounds = settings(args, device)
    present = present_backends(args.backends, device)
    env = benchresults.environment(device)
    machine = {"load": load_average(), "cores": cores, "threads": threads}
    load = "unknown" if machine["load"] is None else f"{machine['load']:.2f}"
    chosen = "--threads" if args.threads else "the physical cores"
    print(f"device {env['device']}; {threads} thread{'s' * (threads != 1)} ({chosen}; {cores} physical cores); "
          f"load average {load}; {rounds} rounds; {env['versions']}; git {env['git_sha']}")
    rows = []
    for dtype_name, width, batch in itertools.product(dtype_names, widths, batch_sizes):
        cases = [] if args.step_only else op_cases(present, width, batch, dtype_name, device)
        for case in cases + [step_case(present, width, batch, dtype_name, device, args.baseline)]:
            rows += bench_case(case, rounds, device, machine, env)
    path = benchresults.write(args.out, rows)
    print(f"\n{len(rows)} rows appended to {path}")
    return 0


# ---- --model: the user's own model -------------------------------------------------------
def model_net(factory: Callable[[], nn.Module], name: str, nodes: int, loss: str, device: str) -> lp.LocalSequential:
    """``factory()`` localized for rule ``name`` as memory.compare_model does it: bp and
    bp+checkpoint end to end (the latter one checkpointed segment per block), the local
    rules in ``nodes`` nodes."""
    baseline = name in ("bp", "bp+checkpoint")
    rule = lp.rules.BP(checkpoint=True, segment=1) if name == "bp+checkpoint" else name
    torch.manual_seed(0)
    return lp.localize(factory().to(device), rule, nodes=None if baseline else nodes, loss=loss)


def run_model(args) -> int:
    """--model: step time (paired, alternated) and peak step memory per rule."""
    from localprop.cli.profile import MODEL_RULES, model_batch
    from localprop.config import import_target

    device = args.device or "cpu"
    threads, cores = set_threads(args.threads)
    factory = import_target("--model", args.model)
    x, y, loss = model_batch(factory, args.input_shape, args.tokens, args.batch, device)
    rules, rounds = list(args.rules or MODEL_RULES), args.rounds or (5 if args.quick else 10)
    nets, peaks = {}, {}
    for rule in tqdm(rules, desc="memory", disable=args.quiet, leave=False):
        nets[rule] = model_net(factory, rule, args.nodes, loss, device)
        period = max(1, getattr(nets[rule].rule, "period", 1))
        peaks[rule] = memory.measure_step(nets[rule], x, y, steps=period)
    env, load = benchresults.environment(device), load_average()
    shape = f"input={'x'.join(map(str, args.input_shape or args.tokens))} batch={args.batch} nodes={args.nodes}"
    case = Case(args.model, shape, str(x.dtype).removeprefix("torch."),
                {rule: (lambda i, n=net: n.train_step(x, y)) for rule, net in nets.items()}, args.baseline_rule)
    check_baseline(case)
    times = alternate(case.providers, rounds, sync_for(torch.device(device)))
    rows = summarize(case, times, env)
    rows += [benchresults.Result(case=case.name, provider=r, metric="peak_mib", median=m.peak_bytes / 2**20,
                                 shape=shape, dtype=case.dtype, **env) for r, m in peaks.items()]
    print(f"{args.model}, batch {args.batch}, {args.nodes} nodes for the local rules ({device}); "
          f"{threads} thread{'s' * (threads != 1)} of {cores} physical cores; "
          f"load average {'unknown' if load is None else f'{load:.2f}'}; {rounds} rounds")
    print_model(rows, peaks, case.baseline)
    for line in noise_warnings(times, rounds, load, cores, threads):
        print(line)
    write_model(rows, Path(args.out_dir), case.baseline)
    return 0


def print_model(rows: list[benchresults.Result], peaks: dict[str, memory.StepMemory], baseline: str) -> None:
    print(f"{'rule':<15} {'step ms':>10} {'p20':>9} {'p80':>9} {'time vs ' + baseline:>22} {'peak step MiB':>14}")
    for r in (r for r in rows if r.metric == "median_ms"):
        ratio = f"{r.ratio:.2f} [{r.ratio_p20:.2f}, {r.ratio_p80:.2f}]" if r.ratio is not None else "-"
        print(f"{r.provider:<15} {r.median:>10.2f} {r.p20:>9.2f} {r.p80:>9.2f} {ratio:>22} "
              f"{peaks[r.provider].peak_bytes / 2**20:>14.2f}")


def write_model(rows: list[benchresults.Result], out: Path, baseline: str) -> None:
    """bench.json (the rows), bench.csv (results schema) and bench.png (time and memory bars)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps([r.row() for r in rows], indent=2))
    csv_path = benchresults.write(out / "bench.csv", rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, metric, label in zip(axes, ("median_ms", "peak_mib"), ("step time (ms, median, p20-p80)",
                                                                      "peak step memory (MiB)")):
        sel = [r for r in rows if r.metric == metric]
        err = [[r.median - r.p20 for r in sel], [r.p80 - r.median for r in sel]] if metric == "median_ms" else None
        ax.bar([r.provider for r in sel], [r.median for r in sel], yerr=err, capsize=3)
        ax.set(ylabel=label, title=f"{sel[0].case} ({sel[0].shape})")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / 'bench.json'}, {csv_path} and {out / 'bench.png'}")


def run(args) -> int:
    return run_model(args) if args.model else run_cases(args)


def register(sub) -> None:
    from localprop.cli.profile import _ints

    p = sub.add_parser("bench", help="paired timings: fused ops per backend, the greedy step against the plain "
                                     "PyTorch loop, DGL-style loop, bp, bp+checkpoint; or a model of one's own")
    p.add_argument("--device", help="cpu, cuda or cuda:<index> (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the physical cores)")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"alternated rounds per case (default 15 on CPU, 20 on CUDA, 5 with --quick; "
                        f"below {MIN_ROUNDS} the spread is unreliable)")
    p.add_argument("--backends", nargs="+", default=None, choices=backends.NAMES,
                   help="backends to time (default: every one present); an absent one is an error")
    p.add_argument("--baseline", default="plain", help="provider the greedy step's ratios are to (default plain)")
    p.add_argument("--widths", type=int, nargs="+", help="node widths (CPU: 256 512 1024; CUDA: 1024 4096)")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (CPU: 256; CUDA: 1024 4096)")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), help="CPU: fp32; CUDA: fp32 bf16")
    p.add_argument("--step-only", action="store_true", help="only the greedy step, not the fused ops one by one")
    p.add_argument("--quick", action="store_true", help="one tiny size and 5 rounds (a smoke run; warns)")
    p.add_argument("--out", default="bench/results/kernels.csv", help="results CSV to append rows to")
    model = p.add_argument_group("a model of one's own")
    model.add_argument("--model", default=None, metavar="PKG.MODULE:FACTORY",
                       help="time and profile this zero-argument factory's model per rule "
                            "(e.g. localprop.zoo:resnet18)")
    model.add_argument("--input-shape", type=_ints, default=None, metavar="C,H,W",
                       help="per-sample float input shape")
    model.add_argument("--tokens", type=_ints, default=None, metavar="VOCAB,SEQ", help="the model takes token ids")
    model.add_argument("--batch", type=int, default=32, help="batch size with --model (default 32)")
    model.add_argument("--nodes", type=int, default=4, help="nodes of the local rules (default 4)")
    model.add_argument("--rules", nargs="+", default=None, help="rules (default: those of localprop profile --model)")
    model.add_argument("--baseline-rule", default="bp", help="rule the step-time ratios are to (default bp)")
    model.add_argument("--out-dir", default="out", help="folder for bench.json, bench.csv, bench.png (default out)")
    model.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
