"""Checks shared by the engine and the rules, with errors that name the node."""
from __future__ import annotations

import torch


def check_finite(value: torch.Tensor, node: str, step: int, what: str) -> None:
    """Raise FloatingPointError naming ``node`` and ``step`` if ``value`` has a NaN or inf.
    Costs one device-to-host sync."""
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(
            f"node {node}: non-finite {what} at step {step} ({value.detach().flatten()[:4].tolist()}...); "
            f"no parameter of this node was changed. Lower the learning rate or check the inputs.")
