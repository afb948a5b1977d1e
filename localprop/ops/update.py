"""Fused op 3, the local update: dW = εᵀ u and db = Σ_b ε applied to W, b by the node's
optimizer with torch.optim's exact semantics (hyperparameters read from its param
groups, state kept in its ``state`` so that state_dict() works unchanged), always
through ``optimizer.step()``, so that its hooks and schedulers see every step."""
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
    """Reference: materialise each gradient, then one ``optimizer.step()``. The gradients
    are taken in the parameters' dtype with autocast off: under ``torch.autocast`` the
    factors may be of a lower precision, and a parameter's ``.grad`` must have its dtype."""
    for g in grads:
        with torch.autocast(g.inp.device.type, enabled=False):
            g.weight.grad = g.err.to(g.weight.dtype).t() @ g.inp.to(g.weight.dtype)
            if g.bias is not None:
                g.bias.grad = g.err.to(g.bias.dtype).sum(0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def merge(grads: list[LinearGrad]) -> list[LinearGrad]:
    """One LinearGrad per parameter: several for the same (weight, bias) sum their
    gradients, Σ errᵢᵀ inpᵢ = [err₁; err₂]ᵀ [inp₁; inp₂], so they are stacked along the
    batch (rules such as SGR's finite differences add passes this way)."""
    if len({id(g.weight) for g in grads}) == len(grads):  # the common case, one per parameter
        return grads
    groups: dict[int, list[LinearGrad]] = {}
    for g in grads:
        groups.setdefault(id(g.weight), []).append(g)
    merged = []
    for same in groups.values():
        if any(g.bias is not same[0].bias for g in same):
            raise ValueError("update: one weight was given with two different biases")
        merged.append(same[0] if len(same) == 1 else LinearGrad(
            same[0].weight, same[0].bias, torch.cat([g.err for g in same]), torch.cat([g.inp for g in same])))
    return merged


def grad_norm_sq(g: LinearGrad) -> torch.Tensor:
    """‖errᵀ inp‖²_F + ‖Σ_b err‖² [] (the bias term without a bias: 0), without
    materialising dW when the batch is the smaller side: ‖εᵀu‖²_F = Σ (εεᵀ) ⊙ (uuᵀ), two
    [B, B] Gram matrices, B²(N + K) multiply-adds against dW's B·N·K."""
    rows, n, k = g.err.shape[0], g.err.shape[1], g.inp.shape[1]
    if rows * (n + k) < n * k:
        weight = ((g.err @ g.err.t()) * (g.inp @ g.inp.t())).sum()
    else:
        weight = (g.err.t() @ g.inp).square().sum()
    return weight if g.bias is None else weight + g.err.sum(0).square().sum()


def clip(grads: list[LinearGrad], max_norm: float) -> list[LinearGrad]:
    """``grads`` (one per parameter, see :func:`merge`) scaled as
    torch.nn.utils.clip_grad_norm_ scales gradients: by min(1, max_norm / (‖g‖ + 1e-6)),
    ‖g‖ the norm over all of them together (errors scaled: dW and db scale with them)."""
    total = torch.stack([grad_norm_sq(g) for g in grads]).sum().sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    return [LinearGrad(g.weight, g.bias, g.err * scale.to(g.err.dtype), g.inp) for g in grads]


def update(optimizer: torch.optim.Optimizer, grads: list[LinearGrad], *, backend: str,
           max_norm: float | None = None) -> None:
    """The local update on ``backend``; same effect as :func:`update_ref`. Several
    LinearGrads of one parameter add up (see :func:`merge`); with ``max_norm``, their
    gradients are first clipped together to that norm (see :func:`clip`)."""
    grads = merge(grads)
    if max_norm is not None:
        grads = clip(grads, max_norm)
    if backend == "reference":
        return update_ref(optimizer, grads)
    from . import fused_update
    return fused_update.update(optimizer, grads, backend)
