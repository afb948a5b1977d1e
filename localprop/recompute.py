"""Activation checkpointing: a forward whose activations are recomputed in the backward.

torch.utils.checkpoint runs a segment's forward twice, and a module whose forward updates
state of its own would update it twice a step: BatchNorm's running statistics would move
with momentum 1 − (1 − m)² and ``num_batches_tracked`` (the cumulative average when
``momentum=None``) would count every batch twice; spectral normalisation would run two
power iterations, and the recomputed forward, normalising by the second one's estimate,
would not be the forward whose gradient the step takes. Here every buffer of the modules
run is set back to its value before the forward for the recomputation, and to what the
forward left after it: the recomputation is the forward again, and a checkpointed
network's state is that of the same network run without checkpointing.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn


def recomputed(fn: Callable, *args, modules: Iterable[nn.Module], **kwargs):
    """``fn(*args, **kwargs)``, its activations recomputed in the backward when autograd
    records (torch.utils.checkpoint, non-reentrant: gradients of any order). ``modules``:
    every module ``fn`` runs (e.g. ``fn.modules()``); the recomputation sees their buffers
    as the forward saw them and leaves them as the forward left them."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    buffers = list({id(b): b for m in modules for b in m.buffers(recurse=False)}.values())
    if not buffers:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False,
                                             context_fn=lambda: _BufferState(buffers).contexts(), **kwargs)


class _BufferState:
    """The buffers of one checkpointed call, with their values before its forward.

    Every buffer is copied, not only those the forward changes: telling which changed
    would need their values compared, a host synchronisation per buffer on CUDA, and
    version counters cannot tell (native kernels update BatchNorm's running mean and
    variance without bumping theirs). The copies live from the forward to the
    recomputation, as many bytes as the call's buffers (BatchNorm's: two floats a channel)."""

    def __init__(self, buffers: list[torch.Tensor]) -> None:
        self.buffers = buffers
        self.before: list[torch.Tensor] = []

    def contexts(self):
        """(forward context, recomputation context) for torch.utils.checkpoint's context_fn."""
        return self._forward(), self._recomputation()

    @contextlib.contextmanager
    def _forward(self) -> Iterator[None]:
        self.before = [buf.clone() for buf in self.buffers]
        yield

    @contextlib.contextmanager
    def _recomputation(self) -> Iterator[None]:
        """Sets the buffers back for the recomputation and restores what the forward left
        on exit (also when the recomputation stops early, which torch.utils.checkpoint
        does by raising through this context)."""
        after = [buf.clone() for buf in self.buffers]
        _copy(self.buffers, self.before)
        try:
            yield
        finally:
            _copy(self.buffers, after)


def _copy(buffers: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buf, value in zip(buffers, values):
            buf.copy_(value)
