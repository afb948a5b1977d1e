"""Fused op 2, a node's head and error: logits = h Aᵀ + c, mean cross-entropy and its
gradient, the goal error g = dlogits A, the nonlinear error ε = g ⊙ σ'(z), and
optionally the message ε W for the node's predecessor."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import activation as act


class HeadError(NamedTuple):
    loss: torch.Tensor      #: [] mean cross-entropy over the batch
    dlogits: torch.Tensor   #: [B, C] ∂loss/∂logits = (softmax - onehot) / B
    err: torch.Tensor       #: [B, N] ε = ∂loss/∂z of the node
    message: torch.Tensor | None  #: [B, K] ε W, or None when no weight was given


def head_error_ref(h: torch.Tensor, aux: torch.Tensor, head_weight: torch.Tensor | None,
                   head_bias: torch.Tensor | None, y: torch.Tensor, activation: str | None,
                   weight: torch.Tensor | None = None) -> HeadError:
    """PyTorch reference (any float dtype).

    h: [B, N] node output; aux: what the transform kept; head_weight A: [C, N] and
    head_bias c: [C], or both None when h itself is the logits (the last node);
    y: int64 [B] labels; weight W: [N, K] to also return the message ε W.
    """
    logits = h if head_weight is None else F.linear(h, head_weight, head_bias)
    loss = F.cross_entropy(logits, y)
    dlogits = torch.softmax(logits, dim=1)
    dlogits[torch.arange(len(y), device=y.device), y] -= 1
    dlogits /= len(y)
    g = dlogits.clone() if head_weight is None else dlogits @ head_weight
    err = act.times_grad(g, h, aux, activation)
    return HeadError(loss, dlogits, err, None if weight is None else err @ weight)


def head_error(h, aux, head_weight, head_bias, y, activation, weight=None, *, backend: str) -> HeadError:
    """The head-and-error op on ``backend``; same contract as :func:`head_error_ref`."""
    if backend == "reference":
        return head_error_ref(h, aux, head_weight, head_bias, y, activation, weight)
    if backend in ("cpp", "cuda"):
        out = torch.ops.localprop.head_error(h, aux, head_weight, head_bias, y, act.code(activation), weight)
    else:
        from localprop.kernels import head_error as triton_head_error
        out = triton_head_error.head_error(h, aux, head_weight, head_bias, y, act.code(activation), weight)
    loss, dlogits, err, message = out
    # the kernels return an empty tensor for "no message"; the Python contract is None
    return HeadError(loss, dlogits, err, None if weight is None else message)
