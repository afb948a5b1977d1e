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


#: what :func:`held_buffers` holds of one module: its buffer slots (name -> tensor or None),
#: a copy of each tensor's value, and the names of its non-persistent buffers
HeldBuffers = tuple[dict[str, torch.Tensor | None], dict[str, torch.Tensor], set[str]]


def recomputed(fn: Callable, *args, modules: Iterable[nn.Module], **kwargs):
    """``fn(*args, **kwargs)``, its activations recomputed in the backward when autograd
    records (torch.utils.checkpoint, non-reentrant: gradients of any order). ``modules``:
    every module ``fn`` runs (e.g. ``fn.modules()``); the recomputation sees their buffers
    as the forward saw them and leaves them as the forward left them."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    # every module, those without buffers too: a forward may register one
    slots = list({id(m): m for m in modules}.values())
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False,
                                             context_fn=lambda: _BufferState(slots).contexts(), **kwargs)


class _BufferState:
    """The buffers of one checkpointed call, with their values before its forward.

    Buffers are held by their modules' slots, not as tensors, so that a forward that
    replaces a buffer (``self.count = self.count + 1``), fills a slot that held None or
    registers a new one is undone as one that updates a buffer in place. Every buffer is
    copied, not only those the forward changes: telling which changed would need their
    values compared, a host synchronisation per buffer on CUDA, and version counters
    cannot tell (native kernels update BatchNorm's running mean and variance without
    bumping theirs). The copies live from the forward to the
    recomputation, as many bytes as the call's buffers (BatchNorm's: two floats a channel)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.before: list[HeldBuffers] = []

    def contexts(self):
        """(forward context, recomputation context) for torch.utils.checkpoint's context_fn."""
        return self._forward(), self._recomputation()

    @contextlib.contextmanager
    def _forward(self) -> Iterator[None]:
        self.before = held_buffers(self.modules)
        yield

    @contextlib.contextmanager
    def _recomputation(self) -> Iterator[None]:
        """Sets the buffers back for the recomputation and restores what the forward left
        on exit (also when the recomputation stops early, which torch.utils.checkpoint
        does by raising through this context)."""
        after = held_buffers(self.modules)
        put_buffers(self.modules, self.before)
        try:
            yield
        finally:
            put_buffers(self.modules, after)


def held_buffers(modules: list[nn.Module]) -> list[HeldBuffers]:
    """Per module of ``modules`` (its own buffers, not its children's): its buffer slots
    as they are, with a copy of each buffer's value, for :func:`put_buffers` to put back."""
    return [(dict(m._buffers), {name: buf.clone() for name, buf in m._buffers.items() if buf is not None},
             set(m._non_persistent_buffers_set)) for m in modules]


def put_buffers(modules: list[nn.Module], held: list[HeldBuffers]) -> None:
    """Puts back each module's buffer slots as :func:`held_buffers` held them, each tensor
    with the value it held: undoes in-place updates, replacements, slots set to None and
    buffers registered since."""
    with torch.no_grad():
        for m, (slots, values, non_persistent) in zip(modules, held):
            for name, value in values.items():
                slots[name].copy_(value)
            m._buffers.clear()
            m._buffers.update(slots)
            m._non_persistent_buffers_set.clear()
            m._non_persistent_buffers_set.update(non_persistent)
