"""Global backpropagation, the baseline every measurement compares against."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import check_finite
from .base import Rule, StepResult


class BP(Rule):
    """End-to-end backpropagation of the last node's cross-entropy through every node,
    then one step of every node's optimizer (heads, if any, are ignored).

    Args:
        checkpoint: recompute each node's activations in the backward pass
            (torch.utils.checkpoint per node) instead of keeping them: the memory
            competitor a user would otherwise pick. ``rule="bp+checkpoint"``.
    """

    name = "bp"
    uses_heads = False

    def __init__(self, checkpoint: bool = False) -> None:
        self.checkpoint = checkpoint

    def forward_loss(self, net, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Final cross-entropy with the whole autograd graph kept (or checkpointed)."""
        h = x
        for node in net.nodes:
            h = checkpoint(node, h, use_reentrant=False) if self.checkpoint else node(h)
        return F.cross_entropy(h, y)

    def train_step(self, net, x, y, step):
        loss = self.forward_loss(net, x, y)
        last = net.nodes[-1].name
        if net.check_finite:
            check_finite(loss, last, step, "loss")
        loss.backward()
        for node in net.nodes:
            node.optimizer.step()
            node.optimizer.zero_grad(set_to_none=True)
        return StepResult(step, {last: float(loss.detach())})

    def __repr__(self) -> str:
        return f"BP(checkpoint={self.checkpoint})"
