"""How a rule's node steps run apart from the chain loop, derived from what the rule
declares (``rule.messages``, a :class:`~localprop.rules.base.Messages`) and the hooks it
offers: no code here knows any rule."""
from __future__ import annotations

from typing import Any

import torch

from .. import rules
from .errors import NotDecoupled


class Stage:
    """One rule's node steps as a pipeline stage runs them. The flags say which messages
    cross a boundary besides the activation: ``forward`` (shaped like h, with it),
    ``backward`` (per-sample [B], back one node), ``top_down`` (a matrix back one rank
    before every step) or ``top_down_once`` (the same, once at the start of a run)."""

    def __init__(self, rule: rules.Rule) -> None:
        reason = rule.not_decoupled()
        if reason is not None:
            raise NotDecoupled(reason)
        declared = rule.messages
        self.rule = rule
        self.forward, self.backward = declared.forward, declared.backward
        self.top_down, self.top_down_once = declared.top_down == "step", declared.top_down == "once"
        self.given: dict[int, Any] = {}  # what prepare gave each node for its next step

    def is_global(self, step: int) -> bool:
        return self.rule.is_global(step)

    def prepare(self, net, nodes: range, top: torch.Tensor | None) -> torch.Tensor | None:
        """Ready ``nodes`` from the next rank's matrix ``top``; the matrix for the previous rank."""
        self.given, out = self.rule.prepare(net, nodes, top)
        return out

    def top_shape(self, net, last: int) -> tuple[int, ...]:
        return self.rule.top_shape(net, last)

    def node_state(self, net, k: int) -> list[torch.Tensor]:
        return self.rule.node_state(net, k)

    def step(self, net, k: int, u: torch.Tensor, y: torch.Tensor, message, step: int):
        """Node k's step: (h detached, loss, forward message or None, backward message or None)."""
        r = self.rule.node_step(net, k, u, y, self.given.get(k, message), step)
        undeclared = [kind for kind, value, declared in (("forward", r.forward, self.forward),
                                                          ("backward", r.backward, self.backward))
                      if value is not None and not declared]
        if undeclared:
            raise NotDecoupled(f"rule {self.rule.name!r}: node_step returned a {undeclared[0]} message that "
                               f"rule.messages does not declare, so the pipeline cannot send it")
        return r.h, r.loss, r.forward, r.backward

    def absorb(self, net, k: int, h: torch.Tensor, y: torch.Tensor, back: torch.Tensor, step: int) -> None:
        """Node k learns from node k+1's backward message of ``step`` (h: node k's output then)."""
        self.rule.absorb(net, k, h, y, back, step)

    def global_forward(self, net, nodes: range, u: torch.Tensor) -> torch.Tensor:
        """``nodes``' output on u with the autograd graph kept, for a global step (PGL)."""
        return self.rule.global_forward([net.nodes[k] for k in nodes], u, len(net.nodes))


def stage_for(rule: rules.Rule) -> Stage:
    """The Stage of ``rule``, or NotDecoupled saying why it cannot run distributed."""
    return Stage(rule)
