"""localize(): turn an existing model into a network of local-learning nodes."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import rules
from .engine import LocalSequential, OptimizerFactory


def units(children: Sequence[nn.Module]) -> list[list[nn.Module]]:
    """Split ``children`` into units: each starts at a child with parameters and takes the
    parameter-free children after it (activations, pooling, flatten); parameter-free
    children before the first such child join the first unit."""
    groups: list[list[nn.Module]] = []
    for child in children:
        has_params = any(True for _ in child.parameters())
        if has_params and (not groups or any(True for m in groups[-1] for _ in m.parameters())):
            groups.append([child])
        elif groups:
            groups[-1].append(child)
        else:
            groups.append([child])
    return groups


def split_balanced(parts: Sequence[list[nn.Module]], nodes: int) -> list[nn.Module]:
    """Join consecutive ``parts`` into ``nodes`` groups whose counts of parts differ by at
    most one (earlier groups take the extra). A group of one module is that module itself."""
    if not 1 <= nodes <= len(parts):
        raise ValueError(f"nodes must lie in [1, {len(parts)}] for a model of {len(parts)} blocks with "
                         f"parameters, got {nodes}")
    size, extra = divmod(len(parts), nodes)
    groups, start = [], 0
    for k in range(nodes):
        stop = start + size + (k < extra)
        modules = [m for part in parts[start:stop] for m in part]
        groups.append(modules[0] if len(modules) == 1 else nn.Sequential(*modules))
        start = stop
    return groups


def localize(model: nn.Module | Sequence[nn.Module], rule: str | rules.Rule = "greedy", *,
             num_classes: int, optimizer: OptimizerFactory | None = None, nodes: int | None = None,
             backend: str | None = None, example_input: torch.Tensor | None = None,
             check_finite: bool = True) -> LocalSequential:
    """Make every block of ``model`` a node that learns locally.

    Args:
        model: an ``nn.Sequential`` or a list of blocks. Each child with parameters starts a
            node, which also takes the parameter-free children after it (ReLU, pooling, ...).
        rule, num_classes, optimizer, backend, check_finite: as in :class:`LocalSequential`.
        nodes: K, group those blocks into K contiguous, balanced nodes (default: one each).
        example_input: a batch [B, ...] for the dry run that finds every node's output shape
            (and so its head); without it the dry run happens on the first batch.

    The blocks are the user's own modules, trained in place: after training, ``model`` is
    the trained model. Returns a :class:`LocalSequential`.
    """
    if isinstance(model, nn.Sequential):
        children = list(model.children())
    elif isinstance(model, (list, tuple, nn.ModuleList)) and all(isinstance(m, nn.Module) for m in model):
        children = list(model)
    else:
        raise TypeError(f"localize() takes an nn.Sequential or a list of nn.Module blocks, got {type(model).__name__}")
    if not children:
        raise ValueError("localize() got a model with no blocks")
    parts = units(children)
    blocks = split_balanced(parts, len(parts) if nodes is None else nodes)
    net = LocalSequential(*blocks, rule=rule, num_classes=num_classes, optimizer=optimizer,
                          backend=backend, check_finite=check_finite)
    if example_input is not None:
        net.build(example_input)
    return net
