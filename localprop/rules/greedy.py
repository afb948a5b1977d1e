"""Decoupled greedy local learning (DGL; InfoPro without its reconstruction term)."""
from __future__ import annotations

import torch.nn.functional as F

from .base import LocalRule


class Greedy(LocalRule):
    """Each node k minimises L_k = CE(a_k(h_k), y) through its own head a_k (the last
    node: its own output is the logits) and updates at once; nothing crosses a node
    boundary but the detached activation.

    Fused nodes (LocalLinear) take this step with the fused ops and no autograd graph.
    """

    name = "greedy"

    def node_step(self, net, k, u, y, message, step):
        node = net.nodes[k]
        if node.fused:
            h, loss = node.fused_ce_step(u, y, step)
            return h, loss, None
        h = node(u)
        loss = F.cross_entropy(node.head_logits(h), y)
        node.learn(loss, step)
        return h.detach(), loss.detach(), None
