"""Fused op 3, the local update: dW = εᵀ u and db = Σ_b ε applied to W, b by the node's
optimizer with torch.optim's exact semantics (hyperparameters read from its param
groups, state kept in its ``state`` so that state_dict() works unchanged)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class LinearGrad(NamedTuple):
    """The gradient of one linear map, given by its factors: dW = errᵀ inp, db = Σ_b err."""
    weight: torch.Tensor        #: [N, K] parameter
    bias: torch.Tensor | None   #: [N] parameter or None
    err: torch.Tensor           #: [B, N] error at the map's output
    inp: torch.Tensor           #: [B, K] the map's input


def update_ref(optimizer: torch.optim.Optimizer, grads: list[LinearGrad]) -> None:
    """Reference: materialise each gradient, then one ``optimizer.step()``."""
    for g in grads:
        g.weight.grad = g.err.t() @ g.inp
        if g.bias is not None:
            g.bias.grad = g.err.sum(0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def update(optimizer: torch.optim.Optimizer, grads: list[LinearGrad], *, backend: str) -> None:
    """The local update on ``backend``; same effect as :func:`update_ref`."""
    if backend == "reference":
        return update_ref(optimizer, grads)
    from . import fused_update
    return fused_update.update(optimizer, grads, backend)
