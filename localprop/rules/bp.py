"""Global backpropagation, the baseline every measurement compares against."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import check_finite
from .base import Rule, StepResult


class BP(Rule):
    """End-to-end backpropagation of the last node's cross-entropy through every node,
    then one step of every node's optimizer (heads, if any, are ignored).

    Args:
        checkpoint: keep only the inputs of checkpointed segments in the forward pass and
            recompute the rest in the backward pass (torch.utils.checkpoint): the memory
            competitor a user would otherwise pick. ``rule="bp+checkpoint"``.
        segment: nodes per checkpointed segment. Default: ceil(sqrt(K)) for K nodes, the
            classic choice that keeps O(sqrt(K)) activations. ``segment=1`` checkpoints
            each node alone, which saves nothing on single-layer nodes (their input is
            all they keep anyway) and pays the recomputation.
    """

    name = "bp"
    uses_heads = False

    def __init__(self, checkpoint: bool = False, segment: int | None = None) -> None:
        if segment is not None and segment < 1:
            raise ValueError(f"BP: segment must be >= 1 node, got {segment}")
        self.checkpoint, self.segment = checkpoint, segment
        self.name = "bp+checkpoint" if checkpoint else "bp"

    def forward_loss(self, net, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Final cross-entropy with the whole autograd graph kept (or checkpointed)."""
        if not self.checkpoint:
            h = x
            for node in net.nodes:
                h = node(h)
            return F.cross_entropy(h, y)
        size = self.segment or math.ceil(math.sqrt(len(net.nodes)))
        h = x
        for start in range(0, len(net.nodes), size):
            h = checkpoint(_run_nodes, net.nodes[start:start + size], h, use_reentrant=False)
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
        return f"BP(checkpoint={self.checkpoint}, segment={self.segment})"


def _run_nodes(nodes, h: torch.Tensor) -> torch.Tensor:
    for node in nodes:
        h = node(h)
    return h
