"""Global backpropagation, the baseline every measurement compares against."""
from __future__ import annotations

import math

import torch

from ..errors import check_bool, check_finite, check_int
from ..recompute import recomputed
from ..topology import goal_loss, run_forward
from .base import Rule, StepResult


class BP(Rule):
    """End-to-end backpropagation of the last node's cross-entropy through every node,
    then one step of every node's optimizer (heads, if any, are ignored).

    Args:
        checkpoint: keep only the inputs of checkpointed segments in the forward pass and
            recompute the rest in the backward pass (torch.utils.checkpoint): the memory
            competitor a user would otherwise pick. ``rule="bp+checkpoint"``. Buffers
            (running statistics) are updated once a step (:mod:`localprop.recompute`).
        segment: nodes per checkpointed segment. Default: ceil(sqrt(K)) for K nodes, the
            classic choice that keeps O(sqrt(K)) activations. ``segment=1`` checkpoints
            each node alone, which saves nothing on single-layer nodes (their input is
            all they keep anyway) and pays the recomputation.
    """

    name = "bp"
    uses_heads = False
    graphs = True

    def __init__(self, checkpoint: bool = False, segment: int | None = None) -> None:
        self.checkpoint = check_bool("BP", "checkpoint", checkpoint)
        self.segment = None if segment is None else check_int("BP", "segment", segment, 1)
        self.name = "bp+checkpoint" if checkpoint else "bp"

    def not_decoupled(self) -> str:
        return (f"rule {self.name!r} needs global backpropagation through every node at every step, so its "
                f"nodes cannot update apart: train it in one process, or pipeline it with "
                f"torch.distributed.pipelining")

    def forward_loss(self, net, x, y) -> torch.Tensor:
        """Sum of the goal losses with the whole autograd graph kept (or checkpointed).
        x, y: tensors (LocalSequential) or dicts of them (LocalGraph)."""
        topo = net.topology()
        feeds, targets = net.feeds(x, y)
        if self.checkpoint and topo.is_chain():
            h = self.run_chain(topo.order, feeds[topo.inputs[topo.order[0].name][0]], len(topo.order))
            values = {topo.order[-1].name: h}
        else:
            call = (lambda node, u: recomputed(node, u, modules=node.modules())) if self.checkpoint else \
                (lambda node, u: node(u))
            values = run_forward(topo, feeds, call)
        return sum(goal_loss(g.loss, values[name], targets[g.target]) for name, g in topo.goals.items())

    def run_chain(self, nodes, h: torch.Tensor, total: int) -> torch.Tensor:
        """The output of ``nodes`` (consecutive nodes of a chain of ``total``) on h, with the
        autograd graph kept, or checkpointed in segments sized for the whole chain."""
        if not self.checkpoint:
            return _run_nodes(nodes, h)
        size = self.segment or math.ceil(math.sqrt(total))
        for start in range(0, len(nodes), size):
            segment = nodes[start:start + size]
            h = recomputed(_run_nodes, segment, h, modules=(m for node in segment for m in node.modules()))
        return h

    def train_step(self, net, x, y, step):
        loss = self.forward_loss(net, x, y)
        topo = net.topology()
        last = topo.order[-1].name if len(topo.goals) == 1 else "+".join(topo.goals)
        if net.check_finite:
            check_finite(loss, last, step, "loss")
        loss.backward()
        if net.max_grad_norm is not None:  # end-to-end backprop: one norm over every node
            torch.nn.utils.clip_grad_norm_([p for node in topo.order for p in node.optimized_parameters()],
                                           net.max_grad_norm)
        # every node steps and frees its gradients before any is checked, so that a failing
        # check leaves no gradient behind for the next backward to add to
        for node in topo.order:
            node.optimizer.step()
            node.optimizer.zero_grad(set_to_none=True)
        for node in topo.order:
            node.check_update(node.optimized_parameters(), step)
        return StepResult(step, {last: float(loss.detach())})

    def __repr__(self) -> str:
        return f"BP(checkpoint={self.checkpoint}, segment={self.segment})"


def _run_nodes(nodes, h: torch.Tensor) -> torch.Tensor:
    for node in nodes:
        h = node(h)
    return h
