"""The rule interface. A rule decides (a) each node's local objective, (b) the messages
that cross node boundaries and (c) the schedule; the engine only holds the nodes and
calls :meth:`Rule.train_step`. New rules subclass :class:`Rule` (a schedule of their own)
or :class:`LocalRule` (the node-by-node loop, with the objective in :meth:`LocalRule.node_step`).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from ..engine import LocalSequential


@dataclass
class StepResult:
    """What one training step returns."""
    step: int                                                   #: index of this step (0-based)
    losses: dict[str, float] = field(default_factory=dict)      #: node name -> its local loss
    extra: dict[str, Any] = field(default_factory=dict)         #: rule-specific figures

    def __repr__(self) -> str:
        losses = ", ".join(f"{k}: {v:.4g}" for k, v in self.losses.items())
        return f"StepResult(step={self.step}, losses={{{losses}}})"


class Rule(abc.ABC):
    """A learning rule. Subclasses set ``name`` and ``uses_heads`` and implement
    :meth:`train_step`."""

    name: ClassVar[str]
    #: True if nodes other than the last need an auxiliary head (built by the engine)
    uses_heads: ClassVar[bool] = False
    #: True if the rule trains any DAG (LocalGraph), not only chains (LocalSequential)
    graphs: ClassVar[bool] = False

    def attach(self, net: LocalSequential) -> None:
        """Build the rule's own state on ``net`` (critics, feedback networks, ...) once the
        engine knows every node's shapes. Modules made here must be registered on ``net``
        (e.g. as ``net.rule_state``) so that state_dict() carries them, and each update of
        them checked by the node they serve (``node.check_update(params, step, owner)``), so
        that a non-finite one fails in the step that makes it."""

    def node_parameters(self, node) -> list[torch.nn.Parameter]:
        """The parameters node.optimizer steps: by default the node's and its head's.
        A rule whose auxiliary part has an optimizer of its own (critics) excludes it."""
        return list(node.parameters())

    def optimizers(self, net) -> list[torch.optim.Optimizer]:
        """The rule's own optimizers (critics', feedback networks'), whose state the
        network saves and restores. By convention they live in ``net.rule_state.optimizers``."""
        return list(getattr(getattr(net, "rule_state", None), "optimizers", None) or [])

    @abc.abstractmethod
    def train_step(self, net: LocalSequential, x: torch.Tensor, y: torch.Tensor, step: int) -> StepResult:
        """Train every node of ``net`` once on the batch (x, y); x and y are validated."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LocalRule(Rule):
    """A rule whose step is the node-by-node loop of local learning:

        for each node k:  u = sg(h_{k-1});  h_k, loss_k, message = node_step(k, u, y, message)

    Every node updates inside node_step, before the next node runs, so that only one
    node's graph and gradients are alive at a time.
    """

    uses_heads = True

    @abc.abstractmethod
    def node_step(self, net: LocalSequential, k: int, u: torch.Tensor, y: torch.Tensor,
                  message: Any, step: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Train node k on input u (detached); return (h_k detached, its loss, the
        message for node k+1)."""

    def train_step(self, net, x, y, step):
        losses = {}
        h, message = x, None
        for k, node in enumerate(net.nodes):
            h, losses[node.name], message = self.node_step(net, k, h.detach(), y, message, step)
        # one host sync for all the losses, after the step
        return StepResult(step, {name: float(v) for name, v in losses.items()})
