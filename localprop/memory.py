"""Peak memory of a training step, measured at the allocator.

- CUDA: the caching allocator's peak (torch.cuda.max_memory_allocated) above what was
  allocated when the step began.
- CPU: every allocation and free of PyTorch's CPU allocator during the step, recorded by
  the profiler's memory events (c10's allocator reports them); the peak of their running
  sum. This is a measurement at the allocator, not an estimate from shapes.

Resident state (parameters, buffers, optimizer state, heads) is reported apart from the
step's peak: ``StepMemory.peak_bytes`` counts only what the step allocates on top of it.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

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
    what was allocated when it began."""
    device = torch.device(device)
    peak = Peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.bytes = torch.cuda.max_memory_allocated(device) - base
    elif device.type == "cpu":
        from torch.profiler import ProfilerActivity, profile
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _quiet_stderr():
            prof.start()
        try:
            yield peak
        finally:
            with _quiet_stderr():
                prof.stop()
        peak.bytes = _profiler_peak(prof)
    else:
        raise ValueError(f"memory measurement supports cpu and cuda devices, got {device}")


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


def measure_step(net: nn.Module, x, y, warmup: int = 1) -> StepMemory:
    """Peak memory of one ``net.train_step(x, y)``, after ``warmup`` steps (so that the
    optimizer state exists and is counted as resident, not as the step's peak).
    x, y: tensors (LocalSequential) or dicts of them (LocalGraph). The network is
    trained by these steps."""
    for _ in range(warmup):
        net.train_step(x, y)
    gc.collect()
    device = _device(x)
    with track_peak(device) as peak:
        net.train_step(x, y)
    params, opt = resident(net)
    return StepMemory(net.rule.name, str(device), peak.bytes, params, opt)


def compare(build: Callable[[str], nn.Module], rules: list[str], x: torch.Tensor, y: torch.Tensor) -> list[StepMemory]:
    """measure_step for each rule on a fresh network ``build(rule)``. A rule's name is
    reported as given (so "bp+checkpoint" stays apart from "bp")."""
    out = []
    for rule in rules:
        m = measure_step(build(rule), x, y)
        m.rule = rule
        out.append(m)
    return out
