"""Splitting a chain's nodes into contiguous stages, one per rank: the nodes' costs (a
FLOP model, or a timing for benchmarks) and the split that minimises the slowest stage."""
from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Callable

import torch

from .stages import stage_for


def node_costs(net, x: torch.Tensor, y: torch.Tensor, repeats: int = 3) -> list[float]:
    """Seconds of each node's local step on the batch (x [B, ...], y int64 [B]): the median
    of ``repeats`` timed runs after one warm-up, on a deep copy (``net`` and the global RNG
    are left as they were). A critic's training counts towards the node that owns it."""
    stage, trial, rng = stage_for(net.rule), copy.deepcopy(net), torch.get_rng_state()
    times: list[list[float]] = [[] for _ in trial.nodes]
    for _ in range(repeats + 1):
        h, message = x, None
        if stage.top_down:
            stage.prepare(trial, range(len(trial.nodes)), None)
        for k in range(len(trial.nodes)):
            start = time.perf_counter()
            u = h
            h, _, message, back = stage.step(trial, k, u, y, message, trial.steps)
            _sync(h)
            times[k].append(time.perf_counter() - start)
            if back is not None:
                start = time.perf_counter()
                stage.absorb(trial, k - 1, u, y, back, trial.steps)
                times[k - 1][-1] += time.perf_counter() - start
    torch.set_rng_state(rng)
    return [statistics.median(t[1:]) for t in times]


def node_flops(net) -> list[int]:
    """A cost model of each node's local step, per sample: forward, backward and update
    of the node and its head, taken as 3x their forward FLOPs (``net.flops()``, counted on
    a dry run). Deterministic, unlike a timing: the same network gives the same costs on
    every rank and in every run. A rule's own modules (critics, feedback nets) are not
    counted."""
    flops = net.flops()
    return [3 * (n + h) for n, h in zip(flops.nodes, flops.heads)]


def partition(costs: list[float], ranks: int, group_cost: Callable[[int, int], float] | None = None) -> list[int]:
    """Node counts per rank (contiguous, each >= 1) minimising the largest group cost: the
    summed cost of its nodes, or ``group_cost(j, k)`` of nodes j..k-1 where costs do not
    add up (a checkpointed group's peak)."""
    K = len(costs)
    if not 1 <= ranks <= K:
        raise ValueError(f"cannot split {K} nodes over {ranks} ranks: every rank needs at least one node")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    group_cost = group_cost or (lambda j, k: prefix[k] - prefix[j])
    # best[r][k]: the smallest slowest-stage cost of nodes 0..k-1 over r stages; cut[r][k]: last cut
    best = [[math.inf] * (K + 1) for _ in range(ranks + 1)]
    cut = [[0] * (K + 1) for _ in range(ranks + 1)]
    best[0][0] = 0.0
    for r in range(1, ranks + 1):
        for k in range(r, K - (ranks - r) + 1):
            for j in range(r - 1, k):
                cost = max(best[r - 1][j], group_cost(j, k))
                if cost < best[r][k]:
                    best[r][k], cut[r][k] = cost, j
    counts, k = [], K
    for r in range(ranks, 0, -1):
        counts.append(k - cut[r][k])
        k = cut[r][k]
    return counts[::-1]


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
