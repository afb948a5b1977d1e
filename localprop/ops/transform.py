"""Fused op 1, the transform of a linear node: z = u Wᵀ + b, h = σ(z), keeping only
what the error step needs (ReLU: a packed 1-bit mask; GELU: z; tanh, sigmoid, none: nothing)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import activation as act


def transform_ref(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  activation: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference (any float dtype, float64 included).

    u: [B, K]; weight: [N, K]; bias: [N] or None.
    Returns h: [B, N] (u's dtype) and aux: uint8 [B, ceil(N/8)] for ReLU, [B, N] z for
    GELU, an empty tensor otherwise.
    """
    z = F.linear(u, weight, bias)
    aux = act.keep_for_grad(z, activation)
    # z is dead once aux is taken (GELU keeps z itself), so σ runs in place: one
    # [B, N] buffer less at the node's peak.
    return act.apply(z, activation, inplace=activation != "gelu"), aux


def transform(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              activation: str | None, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The transform on ``backend`` (a resolved name, see ops.backends.resolve); same
    contract as :func:`transform_ref`."""
    if backend == "reference":
        return transform_ref(u, weight, bias, activation)
    if backend in ("cpp", "cuda"):
        return torch.ops.localprop.transform(u, weight, bias, act.code(activation))
    from localprop.kernels import transform as triton_transform
    return triton_transform.transform(u, weight, bias, act.code(activation))
