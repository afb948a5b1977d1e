"""Default auxiliary heads, built from a node's per-sample output shape."""
from __future__ import annotations

import math

from torch import nn


def default_head(shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """[C] -> Linear(C, classes); [C, H, W] -> AdaptiveAvgPool2d(2), flatten, Linear(4C);
    [C, L] -> AdaptiveAvgPool1d(2), flatten, Linear(2C); any other shape -> flatten, Linear."""
    if len(shape) == 1:
        return nn.Linear(shape[0], num_classes)
    if len(shape) == 3:
        return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * shape[0], num_classes))
    if len(shape) == 2:
        return nn.Sequential(nn.AdaptiveAvgPool1d(2), nn.Flatten(), nn.Linear(2 * shape[0], num_classes))
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), num_classes))
