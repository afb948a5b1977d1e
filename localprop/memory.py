"""Peak memory of a training step, measured at the allocator.

- CUDA: the caching allocator's peak (torch.cuda.max_memory_allocated) above what was
  allocated when the step began.
- CPU: a counting allocator of the C++ extension, which wraps torch's CPU allocator from
  the moment localprop is imported and counts every block it hands out and takes back,
  with their peak (:func:`cpu_counter`). Exact, and it sees the free of a block allocated
  before the measurement began (a gradient a loop kept from its previous step), so the
  same step measured twice gives the same figure, whatever ran before it. Blocks
  allocated before ``import localprop`` are not counted, when allocated or freed.
  Without the extension, CPU memory is read from torch's profiler, with a warning: it
  sees only blocks allocated while it records (a free of an older one counts nothing), and
  its size table lives on between measurements.

Resident state (parameters, buffers, optimizer state, heads) is reported apart from the
step's peak: ``StepMemory.peak_bytes`` counts only what the step allocates on top of it.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import os
import re
import sys
import threading
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn


@dataclass
class StepMemory:
    """Memory of one training step, in bytes."""
    rule: str
    device: str
    peak_bytes: int        #: allocator peak during the step, above what was allocated before it
    param_bytes: int       #: parameters and buffers of the network, heads included
    optimizer_bytes: int   #: every node's optimizer state

    @property
    def resident_bytes(self) -> int:
        return self.param_bytes + self.optimizer_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "resident_bytes": self.resident_bytes}


class Peak:
    """Result of :func:`track_peak`: ``bytes`` is set when the block exits."""
    bytes: int = 0


def _profiler_peak(prof) -> int:
    """Peak of the running sum of the allocator's CPU events in a finished profile."""
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.alloc_size))
    running = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        running += size
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def track_peak(device: torch.device | str) -> Iterator[Peak]:
    """Measure the peak bytes allocated on ``device`` inside the ``with`` block, above
    what was allocated when it began (see the module's docstring for what is counted).
    Measured through the profiler (CPU without the extension), file descriptor 2 passes
    through a filter during the block that drops one line, c10's "Memory block of unknown
    size" log."""
    device = torch.device(device)
    peak = Peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.bytes = torch.cuda.max_memory_allocated(device) - base
    elif device.type == "cpu" and cpu_counter() is not None:
        ops = torch.ops.localprop
        base = ops.cpu_memory_stats()[0]
        ops.cpu_memory_reset_peak()
        yield peak
        peak.bytes = ops.cpu_memory_stats()[1] - base
    elif device.type == "cpu":
        warnings.warn(f"CPU memory is measured through torch's profiler ({_counter_missing()}): the free of a "
                      "block allocated before the measurement is not seen", stacklevel=3)
        from torch.profiler import ProfilerActivity, profile
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _quiet_stderr():
            prof.start()
        try:
            with _dropping_stderr_line(_UNKNOWN_BLOCK):
                yield peak
        finally:
            with _quiet_stderr():
                prof.stop()
        peak.bytes = _profiler_peak(prof)
    else:
        raise ValueError(f"memory measurement supports cpu and cuda devices, got {device}")


def cpu_counter() -> bool | None:
    """Install the extension's counting CPU allocator (the first call; it stays: the blocks
    it counted come back through it). True while it is the CPU allocator in use; None
    without the extension or when another CPU allocator of higher priority displaced it
    (see :func:`_counter_missing`). Called when localprop is imported."""
    from .ops import backends

    if backends.extension_error() is not None:
        return None
    torch.ops.localprop.cpu_memory_install()
    return True if torch.ops.localprop.cpu_memory_stats()[2] else None


def _counter_missing() -> str:
    from .ops import backends

    return backends.extension_error() or "another CPU allocator of higher priority displaced localprop's counter"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 around the profiler's start and stop, which print a
    trace line each from C++ that no setting turns off (only there: never around user code)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


#: c10's CPU allocator logs this (a C++ LOG(WARNING) to file descriptor 2, at the first such
#: free of a process and every 1000th after) when a block allocated before the profiler
#: started is freed while it records; the free adds nothing to the events either way.
_UNKNOWN_BLOCK = b"Memory block of unknown size was allocated before the profiling started"
#: a piece of stderr output ends at a newline or a carriage return (progress bars)
_PIECE_END = re.compile(rb"(?<=[\r\n])")
#: seconds to wait, after the block, for the filter to forward the rest: the pipe ends at
#: once, unless a process started in the block still holds it (then the filter goes on
#: forwarding that process's output in the background)
_FILTER_GRACE = 1.0


@contextlib.contextmanager
def _dropping_stderr_line(text: bytes) -> Iterator[None]:
    """Pass file descriptor 2 through a pipe that forwards all of it as it comes, but the
    lines that contain ``text``. Only a filter on the descriptor reaches a C++ log line:
    it is no Python warning, and c10's log level (TORCH_CPP_LOG_LEVEL, read once at
    import) would silence every C++ warning, not this one."""
    sys.stderr.flush()
    target = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    forwarder = threading.Thread(target=_forward, args=(read_end, target, text), daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(target, 2)  # closes the pipe's last write end here, so that the forwarder ends
        forwarder.join(_FILTER_GRACE)


def _forward(read_end: int, target: int, text: bytes) -> None:
    """Copy the pipe to ``target`` piece by piece, without the pieces that contain ``text``,
    to the pipe's end: still reading once ``target`` fails (stderr closed), so that no
    writer blocks on a full pipe."""
    pending, writable = b"", True
    try:
        while chunk := os.read(read_end, 1 << 16):
            *pieces, pending = _PIECE_END.split(pending + chunk)
            writable = writable and _write_all(target, b"".join(p for p in pieces if text not in p))
        if writable and text not in pending:
            _write_all(target, pending)
    finally:
        os.close(read_end)
        os.close(target)


def _write_all(fd: int, data: bytes) -> bool:
    """Write all of ``data`` to ``fd``; False if it refuses."""
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        return False
    return True


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def resident(net: nn.Module) -> tuple[int, int]:
    """(parameter and buffer bytes, optimizer state bytes) of a built network: every
    node's optimizer and the rule's own (critics', feedback networks')."""
    params = tensor_bytes(list(net.parameters()) + list(net.buffers()))
    states = [v for opt in net.optimizers() for s in opt.state.values() for v in s.values()]
    return params, tensor_bytes(states)


def _device(x) -> torch.device:
    """The device of a batch: a tensor, or a dict of them (LocalGraph inputs)."""
    return (next(iter(x.values())) if isinstance(x, dict) else x).device


def measure_step(net: nn.Module, x, y, warmup: int = 1, steps: int = 1, **inputs) -> StepMemory:
    """Peak memory of ``net.train_step(x, y)``, after ``warmup`` steps (so that the
    optimizer state exists and is counted as resident, not as the step's peak): the
    largest of ``steps`` consecutive steps (give a schedule's period, so that every kind
    of step it makes is measured, PGL's global one included). x, y: tensors
    (LocalSequential) or dicts of them (LocalGraph); ``inputs``: the model's keyword
    inputs. The network is trained by these steps."""
    for _ in range(warmup):
        net.train_step(x, y, **inputs)
    device, peaks = _device(x), []
    for _ in range(steps):
        gc.collect()
        with track_peak(device) as peak:
            net.train_step(x, y, **inputs)
        peaks.append(peak.bytes)
    params, opt = resident(net)
    return StepMemory(net.rule.name, str(device), max(peaks), params, opt)


def compare(build: Callable[[str], nn.Module], rules: list[str], x: torch.Tensor, y: torch.Tensor) -> list[StepMemory]:
    """measure_step for each rule on a fresh network ``build(rule)``. A rule's name is
    reported as given (so "bp+checkpoint" stays apart from "bp")."""
    out = []
    for rule in rules:
        m = measure_step(build(rule), x, y)
        m.rule = rule
        out.append(m)
    return out


def compare_model(model: nn.Module | Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor,
                  rules: Sequence[str] = ("bp", "bp+checkpoint", "greedy"), nodes: int | None = 4,
                  **localize_kwargs) -> list[StepMemory]:
    """Peak step memory of a user's model under each rule: ``model`` (an nn.Module, copied
    for each rule, or a factory ``() -> nn.Module`` called for each, with the same seed)
    localized by :func:`localprop.localize` into ``nodes`` nodes; "bp" and "bp+checkpoint"
    run the model by end-to-end backprop (the latter checkpointing every block). Every
    kind of step a rule makes is measured (PGL: its period of steps, the global one
    included). x [B, ...], y: a batch and its targets; ``localize_kwargs``: loss, block,
    split_points, inputs, ...; keyword inputs of the model go in ``localize_kwargs["batch_inputs"]``."""
    batch_inputs = localize_kwargs.pop("batch_inputs", {})
    return [measure_model_step(model_network(model, name, nodes, **localize_kwargs), name, x, y, **batch_inputs)
            for name in rules]


def model_network(model: nn.Module | Callable[[], nn.Module], rule: str, nodes: int | None,
                  **localize_kwargs) -> nn.Module:
    """The network :func:`compare_model` measures for ``rule``: a fresh copy of ``model``
    (or ``model()``, seeded 0) localized into ``nodes`` nodes, or run end to end for "bp"
    and "bp+checkpoint" (every block checkpointed)."""
    from . import rules as rule_registry
    from .localize import localize

    torch.manual_seed(0)
    fresh = model() if not isinstance(model, nn.Module) else copy.deepcopy(model)
    resolved = rule_registry.resolve(rule)
    baseline = resolved.name in ("bp", "bp+checkpoint")
    if resolved.name == "bp+checkpoint":
        resolved = rule_registry.BP(checkpoint=True, segment=1)  # one checkpointed segment per block
    kwargs = dict(localize_kwargs)
    if not ("split_points" in kwargs and baseline):
        kwargs["nodes"] = None if baseline else nodes
    # with hooks, by name: a hooked network picks its own form of a rule (pgl's global steps without checkpointing)
    return localize(fresh, rule if kwargs.get("hooks") else resolved, **kwargs)


def measure_model_step(net: nn.Module, rule: str, x, y, **inputs) -> StepMemory:
    """:func:`measure_step` over every kind of step the rule makes (its period), the
    result named ``rule`` as given."""
    m = measure_step(net, x, y, steps=max(1, getattr(net.rule, "period", 1)), **inputs)
    m.rule = rule
    return m


@dataclass
class Timeline:
    """Allocated bytes through one step, sampled at every module's forward (start and end)
    and every parameter's gradient: ``bytes[i]`` after event ``events[i]``, ``peaks[i]`` the
    highest in between; above what was allocated when the step began."""
    rule: str
    events: list[str]
    bytes: list[int]
    peaks: list[int]


def timeline(net: nn.Module, x: torch.Tensor, y: torch.Tensor, warmup: int = 1, **inputs) -> Timeline:
    """The allocator's :class:`Timeline` of one ``net.train_step(x, y)`` after ``warmup``
    steps (CPU with localprop's counting allocator, or CUDA)."""
    for _ in range(warmup):
        net.train_step(x, y, **inputs)
    device = _device(x)
    read = _reader(device)
    gc.collect()
    base, _ = read()
    line = Timeline(net.rule.name, [], [], [])

    def mark(event: str) -> None:
        now, peak = read()
        line.events.append(event)
        line.bytes.append(now - base)
        line.peaks.append(max(peak, now) - base)

    handles = []
    for name, module in net.named_modules():
        if not any(True for _ in module.children()):
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: mark(f"forward {n}")))
            handles.append(module.register_forward_hook(lambda m, a, o, n=name: mark(f"forward {n} done")))
    for name, p in net.named_parameters():
        handles.append(p.register_post_accumulate_grad_hook(lambda t, n=name: mark(f"gradient {n}")))
    try:
        mark("start")
        net.train_step(x, y, **inputs)
        mark("end")
    finally:
        for h in handles:
            h.remove()
    return line


def node_peaks(net: nn.Module, line: Timeline) -> list[int | None]:
    """Per node of ``net``: the highest allocated bytes of ``line`` while that node's
    modules ran (its forward and its parameters' gradients; an interval's peak counts for
    the event that ends it), None for a node that never ran."""
    peaks: list[int | None] = [None] * len(net.nodes)
    for event, peak in zip(line.events, line.peaks):
        k = _node_of(event)
        if k is not None and k < len(peaks):
            peaks[k] = peak if peaks[k] is None else max(peaks[k], peak)
    return peaks


def _node_of(event: str) -> int | None:
    """The node index an event of :func:`timeline` names ("forward nodes.3.block.conv1" -> 3)."""
    match = re.match(r"(?:forward|gradient) nodes\.(\d+)\.", event)
    return int(match.group(1)) if match else None


def _reader(device: torch.device) -> Callable[[], tuple[int, int]]:
    """() -> (bytes allocated now, peak since the last call) on ``device``."""
    if device.type == "cuda":
        def read() -> tuple[int, int]:
            torch.cuda.synchronize(device)
            now, peak = torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            return now, peak
        return read
    if device.type != "cpu" or cpu_counter() is None:
        raise RuntimeError(f"a memory timeline needs localprop's counting CPU allocator or CUDA "
                           f"({_counter_missing() if device.type == 'cpu' else device})")
    ops = torch.ops.localprop

    def read() -> tuple[int, int]:
        now, peak = ops.cpu_memory_stats()[:2]
        ops.cpu_memory_reset_peak()
        return now, peak
    return read


cpu_counter()  # at import: frees of every block allocated from here on are counted
