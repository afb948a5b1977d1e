"""Activation checkpointing: a forward whose activations are recomputed in the backward.

torch.utils.checkpoint runs a segment's forward twice, and a module whose forward updates
state of its own would update it twice a step: BatchNorm's running statistics would move
with momentum 1 − (1 − m)² and ``num_batches_tracked`` (the cumulative average when
``momentum=None``) would count every batch twice; spectral normalisation would run two
power iterations, and the recomputed forward, normalising by the second one's estimate,
would not be the forward whose gradient the step takes. Here every buffer that the forward
changed is set back to its value before the forward for the recomputation, and to what the
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
    """The buffers a forward changed, with their values before it (one checkpointed call).

    Why values, not version counters: native kernels update some buffers in place without
    bumping their version (BatchNorm's running mean and variance), so a buffer counts as
    changed when its value after the forward differs from a copy taken before it; copies of
    the unchanged ones are dropped then, so what stays until the backward is what changed."""

    def __init__(self, buffers: list[torch.Tensor]) -> None:
        self.buffers = buffers
        self.changed: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, its value before the forward)

    def contexts(self):
        """(forward context, recomputation context) for torch.utils.checkpoint's context_fn."""
        return self._forward(), self._recomputation()

    @contextlib.contextmanager
    def _forward(self) -> Iterator[None]:
        before = [(buf, buf.clone()) for buf in self.buffers]
        yield
        self.changed = [(buf, value) for buf, value in before if not torch.equal(buf, value)]

    @contextlib.contextmanager
    def _recomputation(self) -> Iterator[None]:
        """Sets the changed buffers back for the recomputation and restores what the
        forward left on exit (also when the recomputation stops early, which
        torch.utils.checkpoint does by raising through this context)."""
        after = [(buf, buf.clone()) for buf, _ in self.changed]
        with torch.no_grad():
            for buf, value in self.changed:
                buf.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for buf, value in after:
                    buf.copy_(value)
