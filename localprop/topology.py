"""The shape of a network as rules see it: nodes in topological order, each node's
inputs (other nodes or the network's named inputs), and the goal nodes with their
targets. LocalSequential is the chain case; LocalGraph any DAG."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import objectives
from .nodes import Node

LOSSES = objectives.NAMES


@dataclass(frozen=True)
class Goal:
    """Node ``node`` is trained against ``targets[target]`` with ``loss`` (a name of
    :data:`LOSSES` or an :class:`~localprop.objectives.Objective`)."""
    node: str
    target: str
    loss: str | objectives.Objective = "cross_entropy"

    @property
    def objective(self) -> objectives.Objective:
        return objectives.resolve(self.loss)


@dataclass
class Topology:
    order: list[Node]                                           #: nodes, each after all its inputs
    inputs: dict[str, list[str]]                                #: node name -> names it reads
    goals: dict[str, Goal]                                      #: goal node name -> its goal
    consumers: dict[str, list[str]] = field(default_factory=dict)  #: name -> nodes that read it

    def __post_init__(self) -> None:
        for node in self.order:
            for name in self.inputs[node.name]:
                self.consumers.setdefault(name, []).append(node.name)

    @property
    def sources(self) -> list[str]:
        """Names read by nodes that are not nodes: the network's inputs."""
        nodes = {n.name for n in self.order}
        return sorted({i for ins in self.inputs.values() for i in ins if i not in nodes})

    @property
    def targets(self) -> list[str]:
        return sorted({g.target for g in self.goals.values()})

    def is_chain(self) -> bool:
        names = [n.name for n in self.order]
        return all(self.inputs[b] == [a] for a, b in zip(names, names[1:])) and len(self.goals) == 1 \
            and names[-1] in self.goals


def gather(topo: Topology, name: str, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """Node ``name``'s input: its inputs' values concatenated along features ([B, ΣK_i])."""
    parts = [values[i] for i in topo.inputs[name]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def run_forward(topo: Topology, feeds: dict[str, torch.Tensor],
                call: Callable[[Node, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every node's output, computed in topological order as ``call(node, input)``."""
    values = dict(feeds)
    for node in topo.order:
        values[node.name] = call(node, gather(topo, node.name, values))
    return values


def goal_loss(loss: str | objectives.Objective, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A goal's loss [] (see :mod:`localprop.objectives`): e.g. the mean cross-entropy over
    the batch (labels [B]) or the mean squared error."""
    objective = objectives.resolve(loss)
    return objective(output, target.long() if objective.classes else target)
