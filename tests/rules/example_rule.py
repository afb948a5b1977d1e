"""A new rule in one file, as a user would write it: nothing in the engine, the nodes or
the pipeline knows it, yet it trains on both kinds of node, in one process and on
several ranks (tests/rules/test_example_rule.py, tests/test_distributed.py).

Hard-example greedy: each node learns greedily from its head's label-smoothed
cross-entropy, with each sample's loss weighted by how hard the previous node found it.
The previous node's per-sample losses travel forward with its output, as a message
shaped like that output (a forward message, declared in ``messages``)."""
from __future__ import annotations

import torch.nn.functional as F

from localprop.rules.base import LocalRule, Messages, NodeStep


class HardExampleGreedy(LocalRule):
    """Node k minimises mean_b w_b · CE_s(a_k(h_k(b)), y(b)), CE_s label-smoothed by
    ``smoothing``, with w = (1 + ℓ_{k-1} / mean_b ℓ_{k-1}) / 2 (w = 1 at node 0), ℓ_{k-1}
    node k-1's per-sample losses: a sample the previous node found twice as hard as the
    average counts 1.5 times."""

    name = "hard-example-greedy"
    messages = Messages(forward=True)

    def __init__(self, smoothing: float = 0.1) -> None:
        self.smoothing = smoothing

    def node_step(self, net, k, u, y, message, step):
        if message is None:
            weights = None
        else:
            previous = message.flatten(1)[:, 0]
            weights = (1 + previous / previous.mean().clamp_min(1e-12)) / 2

        def objective(h, head):
            losses = F.cross_entropy(head(h), y, reduction="none", label_smoothing=self.smoothing)
            return losses if weights is None else losses * weights

        r = net.nodes[k].local_step(u, step, loss=objective, per_sample=True)
        # the per-sample losses, broadcast to the output's shape: the message travels with h
        shape = (len(y),) + (1,) * (r.h.dim() - 1)
        return NodeStep(r.h, r.loss, forward=r.per_sample.reshape(shape).expand_as(r.h).contiguous())
