"""Periodic global guidance (after Bhatti & Moon, arXiv 2208.00821).

The paper's schedule could not be read; the one here (one global step per period,
the final loss only) is the library's own reading of its abstract.
"""
from __future__ import annotations

import torch

import contextlib

from torch import nn

from ..errors import check_bool, check_choice, check_int, received
from .base import Rule, StepResult
from .bp import BP


class PGL(Rule):
    """A schedule around a local rule: on every ``period``-th step (steps period−1,
    2·period−1, ...) one global step, end-to-end backprop of the last node's
    cross-entropy through every node (heads untouched) and one step of every node's
    optimizer; on all other steps the local rule's step.

    The local rule's heads and state stay in place across global steps (``uses_heads``,
    :meth:`attach` and :meth:`node_parameters` are the local rule's), so its critics or
    feedback networks are simply not trained on a global step.

    Args:
        local: the local rule, a name ("greedy", "sgr", "critic", "bll", "locprop") or a Rule
            (default "greedy").
        period: steps per global step, an int >= 1 (default 4; period 1 is plain bp).
        checkpoint: activation checkpointing in the global step (default True), so that its
            peak memory stays near the local steps' (see BP's ``segment``).
        segment: nodes per checkpointed segment (default: BP's ceil(sqrt(K))).
        global_state: the optimizer state the global steps use: "shared" (default) steps
            each node's own optimizer, so its momentum mixes local and global gradients;
            "own" gives every node a second optimizer, built by the network's optimizer
            factory over the same parameters, which only the global steps use, so the local
            steps' state never sees a global gradient. The second optimizers are kept in
            ``net.rule_state.global_optimizers`` and saved by state_dict(); an lr scheduler
            on ``node.optimizer`` does not reach them. "own" trains in one process only.
            Measured on MNIST-1D's 8-node 1-D CNN (bench/rules/converge.py, 3 seeds, lr
            chosen on three seeds' validation, one lr drop), "own" was lower, 93.6 ± 1.7%
            against 95.1 ± 1.0% (at a constant lr 92.5 ± 1.2 against 94.3 ± 1.3; with the
            former linear heads of maps 68.7 ± 15.4 against 76.1 ± 18.6): hence the default.

    StepResult.extra["global"]: True on global steps, False on local ones.
    """

    name = "pgl"

    def __init__(self, local="greedy", period: int = 4, checkpoint: bool = True, segment: int | None = None,
                 global_state: str = "shared") -> None:
        self.local = _local_rule(local)
        self.global_state = check_choice("PGL", "global_state", global_state, ["shared", "own"])
        self.period = check_int("PGL", "period", period, 1)
        # checked here too, so that the error names PGL rather than its inner BP
        checkpoint = check_bool("PGL", "checkpoint", checkpoint)
        segment = None if segment is None else check_int("PGL", "segment", segment, 1)
        self.global_rule = BP(checkpoint=checkpoint, segment=segment)
        self.uses_heads = self.local.uses_heads
        self.own_heads = self.local.own_heads

    def attach(self, net) -> None:
        self.local.attach(net)
        if self.global_state == "own":
            if getattr(net, "rule_state", None) is None:  # greedy, sgr keep no state of their own
                net.rule_state = nn.ModuleDict()
            # the parameters node.optimizer will step, by the same factory: a twin of it (a
            # node without parameters gets no optimizer, as it gets no node.optimizer)
            net.rule_state.global_optimizers = [net.optimizer_factory(params) for node in net.topology().order
                                                if (params := self.node_parameters(node))]

    def optimizers(self, net):
        """The local rule's own optimizers, then (``global_state="own"``) the global steps'."""
        own = getattr(getattr(net, "rule_state", None), "global_optimizers", None) or []
        return self.local.optimizers(net) + list(own)

    def node_parameters(self, node):
        return self.local.node_parameters(node)

    def is_global(self, step: int) -> bool:
        return step % self.period == self.period - 1

    # in a pipeline: the local rule's messages and hooks, and the global steps' forward
    @property
    def messages(self):
        return self.local.messages

    def not_decoupled(self):
        if self.global_state == "own":
            return "PGL(global_state='own') keeps the global steps' optimizers in one process"
        return self.local.not_decoupled()

    def node_step(self, net, k, u, y, message, step):
        return self.local.node_step(net, k, u, y, message, step)

    def absorb(self, net, k, h, y, back, step):
        return self.local.absorb(net, k, h, y, back, step)

    def prepare(self, net, nodes, top):
        return self.local.prepare(net, nodes, top)

    def top_shape(self, net, last):
        return self.local.top_shape(net, last)

    def node_state(self, net, k):
        return self.local.node_state(net, k)

    def global_forward(self, nodes: list, u: torch.Tensor, total: int) -> torch.Tensor:
        """``nodes``' output on u [B, ...] with the autograd graph kept, checkpointed as the
        global steps are in one process (``total``: the chain's node count)."""
        return self.global_rule.run_chain(nodes, u, total)

    def train_step(self, net, x, y, step) -> StepResult:
        is_global = self.is_global(step)
        if not is_global:
            result = self.local.train_step(net, x, y, step)
        else:
            with self._global_optimizers(net):
                result = self.global_rule.train_step(net, x, y, step)
        result.extra["global"] = is_global
        return result

    @contextlib.contextmanager
    def _global_optimizers(self, net):
        """Under "own", every node's optimizer swapped for its global twin for the duration
        of a global step (BP steps ``node.optimizer``), restored even if the step fails."""
        if self.global_state == "shared":
            yield
            return
        order = [node for node in net.topology().order if node.optimizer is not None]
        local = [node.optimizer for node in order]
        try:
            for node, opt in zip(order, net.rule_state.global_optimizers):
                node.optimizer = opt
            yield
        finally:
            for node, opt in zip(order, local):
                node.optimizer = opt

    def __repr__(self) -> str:
        return (f"PGL(local={self.local!r}, period={self.period}, global_rule={self.global_rule!r}, "
                f"global_state={self.global_state!r})")


def _local_rule(local) -> Rule:
    """PGL's local rule from a name or a Rule: anything but bp and pgl itself."""
    from . import REGISTRY, resolve  # the registry imports this module

    names = [name for name in REGISTRY if name not in ("bp", "bp+checkpoint", "pgl")]
    if isinstance(local, str):
        return resolve(check_choice("PGL", "local", local, names))
    if not isinstance(local, Rule):
        raise TypeError(f"PGL: local must be a rule name ({', '.join(names)}) or a Rule, "
                        f"got {received(local)}")
    if isinstance(local, (BP, PGL)):
        raise ValueError(f"PGL: local must be a local rule ({', '.join(names)}), got rule {local.name!r}")
    return local
