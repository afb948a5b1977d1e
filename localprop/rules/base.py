"""The rule interface. A rule decides (a) each node's local objective, (b) the messages
that cross node boundaries and (c) the schedule; the engine only holds the nodes and
calls :meth:`Rule.train_step`. New rules subclass :class:`Rule` (a schedule of their own)
or :class:`LocalRule` (the node-by-node loop, with the objective in :meth:`LocalRule.node_step`,
which takes each node's step through the one node protocol, :meth:`Node.local_step`).
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
        losses = ", ".join(f"{k!r}: {v:.4g}" for k, v in self.losses.items())  # keys as the strings they are
        return f"StepResult(step={self.step}, losses={{{losses}}})"


@dataclass(frozen=True)
class Messages:
    """What a rule's node steps send across node boundaries, declared as data: the pipeline
    across processes (localprop.distributed) derives its traffic from it, so a new rule
    trains distributed without code there."""
    forward: bool = False   #: NodeStep.forward, shaped like the node's output h, to node k+1
    backward: bool = False  #: NodeStep.backward, per-sample [B], to node k-1, taken in by Rule.absorb
    #: "step": before every step, a matrix from the later nodes readies the earlier ones
    #: (Rule.prepare, Rule.top_shape: BLL's prototypes); "once": the same at the start of a run
    top_down: str | None = None


class Rule(abc.ABC):
    """A learning rule. Subclasses set ``name`` and ``uses_heads`` and implement
    :meth:`train_step`; a rule whose nodes can update apart (a LocalRule) also declares its
    :attr:`messages` and offers the hooks they need, which is all the pipeline asks of it."""

    name: ClassVar[str]
    #: True if nodes other than the last need an auxiliary head (built by the engine)
    uses_heads: ClassVar[bool] = False
    #: what the rule puts in the heads' place in :meth:`attach` (None: it keeps the
    #: engine's heads), so that a network refuses a heads= the rule would discard
    own_heads: ClassVar[str | None] = None
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

    # ---- what a pipeline across processes needs (localprop.distributed) ----------------
    #: the messages the node steps send (see Messages)
    messages: ClassVar[Messages] = Messages()

    def not_decoupled(self) -> str | None:
        """Why the nodes cannot update apart (every step needs all of them), or None."""
        return f"rule {self.name!r} takes no step node by node (it has no node_step)"

    def is_global(self, step: int) -> bool:
        """True if ``step`` is one end-to-end backprop step through every node (PGL)."""
        return False

    def prepare(self, net, nodes: range, top: torch.Tensor | None) -> tuple[dict[int, Any], torch.Tensor | None]:
        """For ``messages.top_down``: ready ``nodes`` (a contiguous run) for the next step
        from ``top``, the matrix the nodes after them sent (None when they end the chain);
        returns (the message each of them receives in node_step, the matrix for the nodes
        before them, None when they start the chain)."""
        raise NotImplementedError(f"rule {self.name!r} sends no top-down message")

    def top_shape(self, net, last: int) -> tuple[int, ...]:
        """The shape of the top-down matrix the nodes ending at ``last`` receive, from sizes
        known without the later nodes' tensors."""
        raise NotImplementedError(f"rule {self.name!r} sends no top-down message")

    def node_state(self, net, k: int) -> list[torch.Tensor]:
        """Tensors the rule keeps for node k outside the node (feedback nets, maps): only
        node k's process needs them."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass(slots=True)
class NodeStep:
    """What :meth:`LocalRule.node_step` returns for node k."""
    h: torch.Tensor               #: node k's output, detached (node k+1's input)
    loss: torch.Tensor            #: [] node k's local loss
    forward: Any = None           #: the message travelling forward with h, to node k+1 (SGR's gradient)
    backward: Any = None          #: the message travelling backward, to node k-1 (critic's per-sample losses)
    figures: dict[str, torch.Tensor] | None = None  #: figure name -> this node's value (StepResult.extra)


class LocalRule(Rule):
    """A rule whose step is the node-by-node loop of local learning:

        messages = before_step(net, step)
        for each node k:  u = sg(h_{k-1})
            r = node_step(net, k, u, y, message_k, step)   # a NodeStep: h_k, loss_k, messages
            if r.backward is not None: absorb(net, k-1, u, y, r.backward, step)

    ``message_k`` is node k-1's forward message, or ``messages[k]`` when before_step gave
    node k one. Every node updates inside node_step (through its :meth:`Node.local_step`),
    before the next node runs, so that only one node's graph and gradients are alive at
    a time; a backward message is absorbed by node k-1 at once, in the same step.
    """

    uses_heads = True
    #: the names of the per-node figures node_step (and absorb) report, as StepResult.extra[name]
    figures: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def node_step(self, net: LocalSequential, k: int, u: torch.Tensor, y: torch.Tensor,
                  message: Any, step: int) -> NodeStep:
        """Train node k on input u (detached) with the message it receives (see the class)."""

    def not_decoupled(self) -> str | None:
        return None

    def before_step(self, net: LocalSequential, step: int) -> dict[int, Any]:
        """Messages computed before the loop, by node (BLL's prototypes); default none."""
        return {}

    def absorb(self, net: LocalSequential, k: int, h: torch.Tensor, y: torch.Tensor, back: Any,
               step: int) -> dict[str, torch.Tensor] | None:
        """Node k learns from node k+1's backward message ``back`` of ``step`` (h: node k's
        output then); returns node k's figures, or None."""
        raise NotImplementedError(f"rule {self.name!r} sends no backward message")

    def train_step(self, net, x, y, step):
        losses: dict[str, torch.Tensor] = {}
        figures: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.figures}
        given = self.before_step(net, step)
        h, message = x, None
        for k, node in enumerate(net.nodes):
            u = h.detach()
            r = self.node_step(net, k, u, y, given.get(k, message), step)
            h, message, losses[node.name] = r.h, r.forward, r.loss
            if r.figures:
                for name, value in r.figures.items():
                    figures[name][node.name] = value
            if r.backward is not None:
                back = self.absorb(net, k - 1, u, y, r.backward, step)
                for name, value in (back or {}).items():
                    figures[name][net.nodes[k - 1].name] = value
        # one host sync for all the losses and figures, after the step
        return StepResult(step, {name: float(v) for name, v in losses.items()},
                          {f: {name: float(v) for name, v in values.items()} for f, values in figures.items()})
