"""Decoupled greedy local learning (DGL; InfoPro without its reconstruction term)."""
from __future__ import annotations

from .base import LocalRule, NodeStep


class Greedy(LocalRule):
    """Each node k minimises L_k = CE(a_k(h_k), y) through its own head a_k (the last
    node: its own output is the logits) and updates at once; nothing crosses a node
    boundary but the detached activation.

    Fused nodes (LocalLinear) take this step with the fused ops and no autograd graph.
    """

    name = "greedy"

    def node_step(self, net, k, u, y, message, step):
        r = net.nodes[k].local_step(u, step, labels=y)
        return NodeStep(r.h, r.loss)
