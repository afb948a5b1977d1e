"""localize(): turn an existing model into a network of local-learning nodes."""
from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from torch import nn

from . import memory, rules
from .engine import LocalSequential, OptimizerFactory, _eval_mode


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


BALANCES = ("count", "params", "memory", "time")


def split_balanced(parts: Sequence[list[nn.Module]], nodes: int, costs: Sequence[float] | None = None) -> list[nn.Module]:
    """Join consecutive ``parts`` into ``nodes`` groups. Without ``costs``, the groups'
    counts of parts differ by at most one (earlier groups take the extra); with a cost per
    part, the contiguous split whose largest summed cost is smallest. A group of one
    module is that module itself."""
    if not 1 <= nodes <= len(parts):
        raise ValueError(f"nodes must lie in [1, {len(parts)}] for a model of {len(parts)} blocks with "
                         f"parameters, got {nodes}")
    if costs is None:
        size, extra = divmod(len(parts), nodes)
        counts = [size + (k < extra) for k in range(nodes)]
    else:
        from .distributed.partition import partition  # the same contiguous min-max split as the pipeline's

        counts = partition(list(costs), nodes)
    groups, start = [], 0
    for count in counts:
        modules = [m for part in parts[start:start + count] for m in part]
        groups.append(modules[0] if len(modules) == 1 else nn.Sequential(*modules))
        start += count
    return groups


def part_costs(parts: Sequence[list[nn.Module]], balance: str, example: torch.Tensor | None) -> list[float] | None:
    """A cost per part for ``balance``: None for "count"; its parameter count for
    "params"; measured on a dry run through the parts on ``example`` [B, ...] for "memory"
    (the allocator peak of the part's forward and backward: the activations it keeps for
    its backward are what a node of several parts holds together, so they add up) and
    "time" (the median of 3 timed forward and backward passes after a warm-up: a timing,
    so two runs can split differently). The model's parameters and modes are left as they
    were (gradients are restored; batch statistics are not updated: eval mode)."""
    if balance == "count":
        return None
    if balance == "params":
        return [float(sum(p.numel() for m in part for p in m.parameters())) for part in parts]
    if example is None:
        raise ValueError(f"localize(balance={balance!r}) measures each block on a dry run: give example_input")
    costs, h = [], example
    for part in parts:
        block = nn.Sequential(*part)
        costs.append(_measure(block, h, balance))
        with torch.no_grad():
            h = block(h)
    return costs


def _measure(block: nn.Module, u: torch.Tensor, balance: str) -> float:
    """``block``'s forward-and-backward cost on input u for ``balance`` ("memory": bytes, "time": s)."""
    saved = {p: p.grad for p in block.parameters()}

    def step() -> None:
        out = block(u)
        out.float().sum().backward()

    try:
        with _eval_mode(block):
            step()  # warm-up: lazily allocated state is not the part's cost
            if balance == "memory":
                with memory.track_peak(u.device) as peak:
                    step()
                return float(peak.bytes)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            return statistics.median(times)
    finally:
        for p, grad in saved.items():
            p.grad = grad


def localize(model: nn.Module | Sequence[nn.Module], rule: str | rules.Rule = "greedy", *,
             num_classes: int, optimizer: OptimizerFactory | None = None, nodes: int | None = None,
             backend: str | None = None, example_input: torch.Tensor | None = None,
             balance: str = "count", check_finite: bool = True) -> LocalSequential:
    """Make every block of ``model`` a node that learns locally.

    Args:
        model: an ``nn.Sequential`` or a list of blocks. Each child with parameters starts a
            node, which also takes the parameter-free children after it (ReLU, pooling, ...).
        rule, num_classes, optimizer, backend, check_finite: as in :class:`LocalSequential`.
        nodes: K, group those blocks into K contiguous, balanced nodes (default: one each).
        balance: what the K nodes balance (see :func:`part_costs`): "count" of blocks
            (default), "params", "memory" (each block's measured step memory, so that no
            node's autograd working set, e.g. a high-resolution stage's, sets the step's
            peak alone) or "time"; "memory" and "time" need ``example_input``.
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
    if balance not in BALANCES:
        raise ValueError(f"localize: balance must be one of {', '.join(BALANCES)}, got {balance!r}")
    parts = units(children)
    costs = part_costs(parts, balance, example_input) if nodes is not None else None
    blocks = split_balanced(parts, len(parts) if nodes is None else nodes, costs)
    net = LocalSequential(*blocks, rule=rule, num_classes=num_classes, optimizer=optimizer,
                          backend=backend, check_finite=check_finite)
    if example_input is not None:
        net.build(example_input)
    return net
