"""Choosing progressive inference's exit thresholds on held-out data.

:meth:`LocalSequential.choose_exits` runs the network once over the data with every head,
then searches thresholds on those scores without running it again: :func:`simulate` gives
exactly what ``predict(x, exit_threshold=...)`` would (in eval mode a sample's exit
depends on that sample alone), so the search costs one pass however many thresholds it
tries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

#: the thresholds tried (a softmax probability a head's maximum must exceed)
CANDIDATES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999)


@dataclass
class Scores:
    """Every head's answer on N samples, as predict() would see them."""
    conf: torch.Tensor    #: float [K-1, N] max softmax of node k's head (0 where it has none)
    guess: torch.Tensor   #: int64 [K-1, N] its argmax
    final: torch.Tensor   #: int64 [N] the last node's argmax
    nodes: list[int]      #: forward FLOPs per sample of each node (K)
    heads: list[int]      #: of each node's head (K; 0 without one)


@dataclass
class ExitChoice:
    """What :meth:`LocalSequential.choose_exits` returns, measured on the data it was given."""
    thresholds: list[float | None]  #: one per node but the last; None: no exit there
    accuracy: float                 #: with these exits
    full_accuracy: float            #: every sample through every node
    flops_fraction: float           #: predict()'s flops_fraction with these exits


def scores(net, x: torch.Tensor, batch_size: int) -> Scores:
    """Every head's max softmax and argmax, and the last node's argmax, of the chain ``net``
    (a LocalSequential, already in eval mode, under no_grad) on x [N, ...], in batches."""
    conf, guess, final = [], [], []
    for xb in x.split(batch_size):
        h, c, g = xb, [], []
        for node in net.nodes[:-1]:
            h = node(h)
            if node.head is None:  # it never lets a sample out: confidence 0
                top = (torch.zeros(len(xb), device=h.device), torch.zeros(len(xb), dtype=torch.int64, device=h.device))
            else:
                top = torch.softmax(node.head(h), 1).max(1)
            c.append(top[0])
            g.append(top[1])
        final.append(net.nodes[-1](h).argmax(1))
        conf.append(torch.stack(c))
        guess.append(torch.stack(g))
    flops = net.flops()
    return Scores(torch.cat(conf, 1).cpu(), torch.cat(guess, 1).cpu(), torch.cat(final).cpu(), flops.nodes, flops.heads)


def simulate(scores: Scores, thresholds: Sequence[float | None]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(labels int64 [N], exit_node int64 [N], flops_fraction) of predict() at
    ``thresholds`` (one per node but the last; None or 1: no exit, that head not run)."""
    t = torch.tensor([1.0 if v is None else float(v) for v in thresholds], dtype=scores.conf.dtype)
    last = len(scores.nodes) - 1
    offered = t < 1
    leaves = (scores.conf > t[:, None]) & offered[:, None]                     # [K-1, N]
    first = torch.where(leaves.any(0), leaves.int().argmax(0), torch.full_like(scores.final, last))
    labels = scores.final.clone()
    out = first < last
    labels[out] = scores.guess[first[out], out.nonzero().squeeze(1)]
    node_cost = torch.tensor(scores.nodes, dtype=torch.float64).cumsum(0)
    head_cost = (torch.tensor(scores.heads[:last], dtype=torch.float64) * offered).cumsum(0)
    spent = node_cost[first] + head_cost[first.clamp(max=last - 1)]
    return labels, first, float(spent.mean()) / sum(scores.nodes)


def choose(scores: Scores, y: torch.Tensor, tolerance: float, per_node: bool,
           candidates: Sequence[float] = CANDIDATES) -> ExitChoice:
    """The thresholds of fewest FLOPs whose accuracy on y stays within ``tolerance`` of the
    full model's: one for every node (``candidates`` or 1, no exits, which always qualifies),
    then, with ``per_node``, each node in turn given the value (None: no exit) of fewest
    FLOPs that keeps the accuracy, until a sweep over the nodes changes nothing."""
    def score(thresholds):
        labels, _, flops = simulate(scores, thresholds)
        return float((labels == y).float().mean()), flops

    full = float((scores.final == y).float().mean())
    floor, k = full - tolerance, len(scores.nodes) - 1
    uniform = {t: score([t] * k) for t in (*candidates, 1.0)}
    t = min((t for t, (acc, _) in uniform.items() if acc >= floor), key=lambda t: (uniform[t][1], -uniform[t][0]))
    current = [None if t >= 1 else t] * k
    best = uniform[t]
    changed = per_node
    while changed:
        changed = False
        for node in range(k):
            for value in (None, *candidates):
                trial = current[:node] + [value] + current[node + 1:]
                acc, flops = score(trial)
                if acc >= floor and flops < best[1]:
                    current, best, changed = trial, (acc, flops), True
    return ExitChoice(current, best[0], full, best[1])
