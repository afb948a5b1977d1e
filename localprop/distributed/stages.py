"""How each rule's node step runs apart from the chain loop: one Stage per rule that sends
messages across ranks (see the package's docstring for the messages)."""
from __future__ import annotations

import torch

from .. import rules
from .errors import NotDecoupled


class Stage:
    """How one rule's node step runs apart from the chain loop."""
    forward = False   #: an activation-sized message travels forward with h
    backward = False  #: per-sample losses [B] travel backward one node
    top_down = False  #: a [classes, D] message travels backward one rank per step (see prepare)
    top_down_once = False  #: the same, once at the start of a run (what it carries never changes)

    def __init__(self, rule: rules.Rule) -> None:
        self.rule = rule

    def is_global(self, step: int) -> bool:
        """True if ``step`` is one end-to-end backprop step through every rank (PGL)."""
        return False

    def prepare(self, net, nodes: range, top: torch.Tensor | None) -> torch.Tensor:
        """For top_down stages: get this rank's ``nodes`` ready for the next step from the
        next rank's message ``top`` (None on the last rank); return the message for the
        previous rank."""
        raise NotImplementedError(f"rule {self.rule.name!r} sends no top-down message")

    def top_shape(self, net, last: int) -> tuple[int, ...]:
        """The shape of the top-down message a rank whose last node is ``last`` receives
        (from sizes every rank knows: the other ranks' tensors are released, see Pipeline)."""
        raise NotImplementedError(f"rule {self.rule.name!r} sends no top-down message")

    def node_state(self, net, k: int) -> list[torch.Tensor]:
        """Tensors the rule keeps for node k outside the node (feedback nets, maps), which
        only node k's rank needs."""
        return []

    def step(self, net, k: int, u: torch.Tensor, y: torch.Tensor, message, step: int):
        """Node k's step: (h detached, loss, forward message or None, backward message or None).
        Every rule the pipeline runs has a Stage subclass that defines it (see stage_for)."""
        raise NotImplementedError(f"no pipeline stage for rule {self.rule.name!r}")

    def absorb(self, net, k: int, h: torch.Tensor, y: torch.Tensor, back: torch.Tensor, step: int) -> None:
        """Node k learns from node k+1's backward message of ``step`` (h: node k's output then)."""


class _LocalRuleStage(Stage):
    def step(self, net, k, u, y, message, step):
        r = self.rule.node_step(net, k, u, y, message, step)
        if r.forward is not None or r.backward is not None:
            raise NotDecoupled(f"rule {self.rule.name!r}: node_step returned a message, which distributed "
                               f"training does not know how to send; only activations cross ranks for it")
        return r.h, r.loss, None, None


class _SGRStage(Stage):
    forward = True

    def step(self, net, k, u, y, message, step):
        r = self.rule.node_step(net, k, u, y, message, step)
        return r.h, r.loss, r.forward, None


class _CriticStage(Stage):
    backward = True

    def step(self, net, k, u, y, message, step):
        r = self.rule.node_step(net, k, u, y, message, step)
        return r.h, r.loss, None, r.backward

    def absorb(self, net, k, h, y, back, step):
        self.rule.train_critic(net, k, h, y, back, step)


class _LocPropStage(Stage):
    """Decoupled LocProp: a node's goal is the labels' code through its composite map,
    which chains through the maps of every node after it. With learned maps (transpose:
    the weights; inverse) each rank sends back the composite map at its first node's
    input, M [classes, N], one small matrix per step, as bll sends its prototypes. Fixed
    feedback maps never change, so their composites travel once, at the start of a run."""

    def __init__(self, rule) -> None:
        super().__init__(rule)
        self.top_down = rule.propagation != "feedback"
        self.top_down_once = not self.top_down

    def prepare(self, net, nodes, top):
        return self.rule.chain_composites(net, top, nodes)

    def top_shape(self, net, last):  # from the nodes' shapes: other ranks' weights are released
        return net.nodes[-1].output_shape[0], net.nodes[last].output_shape[0]

    def node_state(self, net, k):
        maps = net.rule_state.maps
        return [maps[net.nodes[k].name]] if net.nodes[k].name in maps else []

    def step(self, net, k, u, y, message, step):
        h, loss = self.rule.node_step(net, k, u, y, step)
        return h, loss, None, None


class _BLLStage(Stage):
    """BLL: a node's prototype β_k = P_k[y] chains through the feedback nets of every node
    after it, which later ranks own. They depend on the labels alone, so each rank sends
    back one small matrix per step: P at its first node, [classes, D], computed from its
    own b_k and the next rank's matrix (see Pipeline for when each is read)."""
    top_down = True

    def __init__(self, rule) -> None:
        super().__init__(rule)
        self.inputs: dict[int, torch.Tensor] = {}

    def prepare(self, net, nodes, top):
        self.inputs, out = self.rule.prototypes(net, top, nodes)
        return out

    def top_shape(self, net, last):
        return net.num_classes, net.rule_state.feedback[last].in_features

    def node_state(self, net, k):
        return list(net.rule_state.feedback[k].parameters()) if k < len(net.nodes) - 1 else []

    def step(self, net, k, u, y, message, step):
        r = self.rule.node_step(net, k, u, y, self.inputs.get(k), step)
        return r.h, r.loss, None, None


class _PGLStage(Stage):
    """PGL: its local rule's stage, and on every period-th step one synchronised pipeline
    step of end-to-end backprop (Pipeline._global_step): activations forward, gradients back."""

    def __init__(self, rule, local: Stage) -> None:
        super().__init__(rule)
        self.local = local
        self.forward, self.backward, self.top_down = local.forward, local.backward, local.top_down
        self.top_down_once = local.top_down_once

    def is_global(self, step):
        return self.rule.is_global(step)

    def prepare(self, net, nodes, top):
        return self.local.prepare(net, nodes, top)

    def top_shape(self, net, last):
        return self.local.top_shape(net, last)

    def node_state(self, net, k):
        return self.local.node_state(net, k)

    def global_forward(self, net, nodes: range, u: torch.Tensor) -> torch.Tensor:
        """``nodes``' output on u with the autograd graph kept (checkpointed as the rule's
        global steps are in one process)."""
        return self.rule.global_rule.run_chain([net.nodes[k] for k in nodes], u, len(net.nodes))

    def step(self, net, k, u, y, message, step):
        return self.local.step(net, k, u, y, message, step)

    def absorb(self, net, k, h, y, back, step):
        self.local.absorb(net, k, h, y, back, step)


def stage_for(rule: rules.Rule) -> Stage:
    """The Stage of ``rule``, or NotDecoupled/ValueError saying why it cannot run distributed."""
    name = getattr(rule, "name", type(rule).__name__)
    if isinstance(rule, rules.PGL):
        return _PGLStage(rule, stage_for(rule.local))
    if isinstance(rule, rules.BP) or (isinstance(rule, rules.LocProp) and rule.mode == "sync"):
        raise NotDecoupled(f"rule {name!r} needs global backpropagation (or top-down error vectors) through "
                           f"every node at every step, so its nodes cannot update apart: train it in one "
                           f"process, or pipeline it with torch.distributed.pipelining")
    if isinstance(rule, rules.LocProp):
        return _LocPropStage(rule)
    if isinstance(rule, rules.SGR):
        return _SGRStage(rule)
    if isinstance(rule, rules.Critic):
        return _CriticStage(rule)
    if isinstance(rule, rules.BLL):
        return _BLLStage(rule)
    if isinstance(rule, rules.LocalRule):
        return _LocalRuleStage(rule)
    raise NotDecoupled(f"rule {name!r} has no distributed stage; supported: greedy, sgr, critic, bll, pgl "
                       f"over any of them, decoupled locprop, and any LocalRule")
