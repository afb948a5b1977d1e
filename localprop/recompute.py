"""Activation checkpointing: a forward whose activations are recomputed in the backward.

torch.utils.checkpoint runs a segment's forward twice, so a normalisation layer in
training mode (BatchNorm's) would update its running statistics twice a step: the
running mean and variance would move with momentum 1 − (1 − m)², and
``num_batches_tracked`` (the cumulative average when ``momentum=None``) would count every
batch twice. Here the recomputation restores them to what the forward left, so a
checkpointed network's statistics are those of the same network run without it.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn

_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def recomputed(fn: Callable, *args, modules: Iterable[nn.Module], **kwargs):
    """``fn(*args, **kwargs)``, its activations recomputed in the backward when autograd
    records (torch.utils.checkpoint, non-reentrant: gradients of any order). ``modules``:
    every module ``fn`` runs (e.g. ``fn.modules()``); the running statistics of those that
    keep them are left as the forward left them by the recomputation."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._NormBase)]
    if not norms:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), _statistics_kept(norms)),
        **kwargs)


@contextlib.contextmanager
def _statistics_kept(norms: list[nn.Module]) -> Iterator[None]:
    """Restores the running statistics of ``norms`` on exit (also when the recomputation
    stops early, which torch.utils.checkpoint does by raising through this context)."""
    kept = [(buf, buf.clone()) for m in norms for name in _STATISTICS
            if isinstance(buf := getattr(m, name, None), torch.Tensor)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in kept:
                buf.copy_(value)
