"""Decoupled pipeline training of a :class:`~localprop.LocalSequential` across processes
and GPUs with torch.distributed (gloo on CPU, NCCL on GPU).

Local learning has no backward locking: node k updates as soon as its own step is done.
So the chain's nodes are split into contiguous stages, one per rank, and the training
batches stream through them as a pipeline: rank r runs its nodes on batch m while rank r+1
runs its nodes on batch m-1, and every rank updates at once.

Micro-batches. A micro-batch here is one training batch, and every node steps once per
micro-batch: exactly the computation of single-process training on the same batches
(node k at step m sees node k-1's output of step m, computed before node k-1's update of
step m, in both). So in synchronous mode a run reproduces the single-process run bit for
bit on CPU, given the same batches, seeds and thread count. (Splitting a batch into
smaller micro-batches and summing their updates would be a different computation.)

Messages, point to point (isend / recv), with the batch's labels known on every rank
(every rank draws the same batches from the same seeded generator, so only rank 0 reads x):
- forward, rank r -> r+1: the activation h [B, ...]; SGR also its gradient message G_out
  (shaped like h);
- backward, rank r+1 -> r: critic: the first node's per-sample losses ℓ [B], with which rank
  r trains the critic of its last node on its own saved output of that step; bll: the class
  prototypes at the next rank's first node, P [classes, D], one small matrix per step (a
  node's prototypes chain through the feedback nets of every node after it);
  decoupled locprop: likewise the composite map at the next rank's first node, M [classes, N];
- pgl, on its global steps: activations forward, then the gradient of each rank's output
  backward, one synchronised end-to-end backprop step through the pipeline.
Rules with nothing but activations crossing a boundary (greedy, any LocalRule whose
node_step returns no message) need nothing else.

Schedules (``mode``):
- "sync": a backward message of step m is absorbed before the receiving node's step m+1,
  as in one process. Only the boundary node waits for it; the rank's other nodes run on.
- "async": absorbed exactly ``staleness`` steps later (before step m+1+staleness), so the
  upstream rank never waits on the downstream one's current step. The delay is fixed, not
  "whenever it arrives", so async runs are reproducible too; the staleness bound is the
  memory bound as well: a rank keeps staleness+1 outputs of its last node for its critic.
For rules without backward messages the two modes are the same schedule.

Bll's prototypes (decoupled locprop's composite maps) for step m depend on every later
node's feedback net (map) after step m-1, so in "sync" mode the pipeline runs serially
(equal to one process, no speed-up); in "async" mode a rank reads the next rank's matrix
``staleness`` steps late and the ranks run in parallel (see Pipeline._top_down). Pgl's
global steps are synchronous in both modes.

Refused, with an error saying why (:class:`NotDecoupled`): bp and bp+checkpoint (every
step is one backward pass through all nodes: a backward-locked pipeline, which
torch.distributed.pipelining's schedules already serve) and locprop in "sync" mode (error
vectors travel top-down through every node each step).

Partition (:func:`partition`): each node's cost is given, then the contiguous split into
``ranks`` stages that minimises the slowest stage's summed cost is found by dynamic
programming (O(ranks·K²)); the slowest stage sets the pipeline's throughput. The costs a
run uses are a model, not a timing (:func:`node_flops`: every rank computes the same
partition from the same network, in every run, so resumed runs and their checkpoints
agree); :func:`node_costs` times the steps instead, for benchmarks that want it.

Before training, the ranks check that they agree (:func:`agree`): the configuration,
the data, the partition; a rank started differently (another seed trains on other
labels' order) stops every rank with an error naming the difference.

Memory: a rank holds only its own nodes. The Pipeline releases the storage of the other
ranks' nodes (parameters, buffers, heads) and of the rule's state for them (bll's feedback
nets, locprop's maps) when it is built; :meth:`Pipeline.whole` gives them back as zeros
while a checkpoint is written, and :meth:`Pipeline.gather` fills them from their owners at
the end.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import datetime
import math
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from . import memory, rules
from .engine import LocalSequential
from .errors import check_finite
from .topology import goal_loss

TAG_H, TAG_MESSAGE, TAG_BACK, TAG_GRAD, TAG_TOP = 1, 2, 3, 4, 5


class DistributedError(RuntimeError):
    """Another rank died, hung past the timeout, or broke the connection."""


class NotDecoupled(ValueError):
    """The rule needs global backpropagation (or state over all nodes) at every step."""


# ---- per-rule stages ---------------------------------------------------------------------
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


# ---- partition -------------------------------------------------------------------------
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


def partition(costs: list[float], ranks: int) -> list[int]:
    """Node counts per rank (contiguous, each >= 1) minimising the largest summed cost."""
    K = len(costs)
    if not 1 <= ranks <= K:
        raise ValueError(f"cannot split {K} nodes over {ranks} ranks: every rank needs at least one node")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[r][k]: the smallest slowest-stage cost of nodes 0..k-1 over r stages; cut[r][k]: last cut
    best = [[math.inf] * (K + 1) for _ in range(ranks + 1)]
    cut = [[0] * (K + 1) for _ in range(ranks + 1)]
    best[0][0] = 0.0
    for r in range(1, ranks + 1):
        for k in range(r, K - (ranks - r) + 1):
            for j in range(r - 1, k):
                cost = max(best[r - 1][j], prefix[k] - prefix[j])
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


def step_memory(net, counts: list[int], rank: int, x: torch.Tensor | None, y: torch.Tensor) -> int:
    """Peak bytes allocated by one local step of ``rank``'s nodes under the partition
    ``counts`` (memory.track_peak), run on a copy of them apart from any pipeline, after
    one warm-up step (so that the optimizers' state exists, as in a running pipeline):
    the other ranks' part of the input and messages is zeros of their shapes. x [B, ...]
    (rank 0 only), y int64 [B]; ``net`` is left as it was.

    Call it before the process group exists: without the C++ extension, CPU memory is read
    through torch's profiler (see localprop.memory), and a profiler started while a gloo
    group is alive keeps references to the group, so destroy_process_group() no longer
    frees it and its threads outlive the rank."""
    trial, stage, device = copy.deepcopy(net), stage_for(net.rule), next(net.parameters()).device
    first = sum(counts[:rank])
    nodes, has_next, y = range(first, first + counts[rank]), rank < len(counts) - 1, y.to(device)
    zeros = functools.partial(torch.zeros, dtype=next(trial.parameters()).dtype, device=device)
    rng = torch.get_rng_state()
    trial._set_backend(device)

    def local_step() -> None:
        h = x.to(device) if rank == 0 else zeros(len(y), *trial.nodes[first].input_shape)
        message = zeros(h.shape) if stage.forward and rank > 0 else None
        if stage.top_down or stage.top_down_once:
            stage.prepare(trial, nodes, zeros(stage.top_shape(trial, nodes[-1])) if has_next else None)
        for k in nodes:
            h, _, message, _ = stage.step(trial, k, h, y, message, trial.steps)
        trial.steps += 1

    local_step()
    with memory.track_peak(device) as peak:
        local_step()
    torch.set_rng_state(rng)
    return peak.bytes


# ---- the pipeline ----------------------------------------------------------------------
class Pipeline:
    """This rank's stage of a pipeline over ``net`` (built, identical on every rank).

    Args:
        net: the LocalSequential; this rank trains only its own nodes.
        counts: node counts per rank (from :func:`partition`), summing to the node count.
        mode: "sync" or "async" (see the module docstring); staleness: steps, >= 1 for async.
        timeout: seconds, for the error messages (the process group enforces it).
    """

    def __init__(self, net, counts: list[int], mode: str = "sync", staleness: int = 1,
                 timeout: float = 60.0) -> None:
        if mode not in ("sync", "async"):
            raise ValueError(f"mode must be 'sync' or 'async', got {mode!r}")
        if mode == "async" and staleness < 1:
            raise ValueError(f"async mode needs staleness >= 1 step, got {staleness}")
        if not isinstance(net, LocalSequential):
            raise TypeError(f"Pipeline runs a LocalSequential (a chain of nodes), got {type(net).__name__}")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if len(counts) != self.world or sum(counts) != len(net.nodes) or min(counts) < 1:
            raise ValueError(f"partition {counts} does not split {len(net.nodes)} nodes over {self.world} ranks")
        self.net, self.counts, self.stage = net, list(counts), stage_for(net.rule)
        self.first = sum(counts[:self.rank])
        self.nodes = range(self.first, self.first + counts[self.rank])
        self.last = self.nodes[-1]
        self.delay = 0 if mode == "sync" else staleness
        self.timeout = timeout
        self.device = next(net.parameters()).device
        # step -> (h, y, buffer, its irecv or None once arrived): outputs awaiting their backward message
        self.pending: dict[int, list] = {}
        # step t -> (buffer, its irecv or None): the next rank's top-down message sent before its step t
        self.tops: dict[int, list] = {}
        self.prepared = False
        self.sends: list[tuple[int, Any]] = []
        self.wait_seconds = 0.0
        net._set_backend(self.device)
        self.released: list[tuple[torch.Tensor, torch.Size]] = []
        self._release()

    @property
    def has_next(self) -> bool:
        return self.rank < self.world - 1

    def owner(self, k: int) -> int:
        """The rank that trains node k."""
        return next(r for r in range(self.world) if k < sum(self.counts[:r + 1]))

    def step(self, x: torch.Tensor | None, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One micro-batch through this rank's nodes. x [B, ...] (read on rank 0 only), y
        int64 [B] on every rank. Returns this rank's node name -> loss (0-dim tensors)."""
        step = self.net.steps
        self._reap(step)
        if self.stage.top_down and not self.prepared:
            self._top_down(step, send=step == 0)  # a resumed run sent this step's message before
        elif self.stage.top_down_once and not self.prepared:
            self._top_down_once()
        self.prepared = True
        y = y.to(self.device, torch.int64)  # the network's validation is not on this path
        losses = self._global_step(x, y, step) if self.stage.is_global(step) else self._local_step(x, y, step)
        if self.stage.top_down:
            self._top_down(step + 1)
        self.net.steps += 1
        return losses

    def _local_step(self, x, y, step):
        net = self.net
        if self.rank == 0:
            h, message = x.to(self.device), None
        else:
            shape = (len(y), *net.nodes[self.first].input_shape)
            h = self._recv(shape, TAG_H, self.rank - 1, "activations")
            message = self._recv(shape, TAG_MESSAGE, self.rank - 1, "forward message") if self.stage.forward else None
        losses = {}
        for k in self.nodes:
            if k == self.last and self.has_next and self.stage.backward:
                self._absorb(upto=step - 1 - self.delay)
            u = h
            h, losses[net.nodes[k].name], message, back = self.stage.step(net, k, u, y, message, step)
            if back is not None and k > self.first:
                self.stage.absorb(net, k - 1, u, y, back, step)
            elif back is not None and self.rank > 0:
                self._send(back, self.rank - 1, TAG_BACK, step)
        if self.has_next:
            self._send(h, self.rank + 1, TAG_H, step)
            if self.stage.forward:
                self._send(message, self.rank + 1, TAG_MESSAGE, step)
            if self.stage.backward:
                self._expect_back(step, h, y)
        return losses

    def _global_step(self, x, y, step):
        """PGL's global step: end-to-end backprop through every rank, synchronised:
        activations go forward as in a local step, then the gradient of each rank's output
        comes back from the next rank (TAG_GRAD); each rank steps its own nodes' optimizers."""
        net = self.net
        if self.has_next and self.stage.backward:
            self._absorb(upto=step - 1 - self.delay)
        if self.rank == 0:
            u = x.to(self.device)
        else:
            u = self._recv((len(y), *net.nodes[self.first].input_shape), TAG_H, self.rank - 1,
                           "activations").requires_grad_()
        out, losses = self.stage.global_forward(net, self.nodes, u), {}
        if self.has_next:
            self._send(out.detach(), self.rank + 1, TAG_H, step)
            grad = self._recv(out.shape, TAG_GRAD, self.rank + 1, "gradients")
            torch.autograd.backward(out, grad)
        else:
            name = net.nodes[self.last].name
            loss = goal_loss(net.topology().goals[name].loss, out, y)
            if net.check_finite:
                check_finite(loss, name, step, "loss")
            loss.backward()
            losses[name] = loss.detach()
        if self.rank > 0:
            self._send(u.grad, self.rank - 1, TAG_GRAD, step)
        for k in self.nodes:
            net.nodes[k].optimizer.step()
            net.nodes[k].optimizer.zero_grad(set_to_none=True)
        for k in self.nodes:  # after every node has stepped, as in one process: no gradient is left behind
            net.nodes[k].check_update(net.nodes[k].optimized_parameters(), step)
        return losses

    def _top_down_once(self) -> None:
        """Ready this rank's nodes from the next rank's top-down message and pass its own on,
        once, at the first step of a run, fresh or resumed (every rank does it then)."""
        top = None
        if self.has_next:
            top = self._recv(self.stage.top_shape(self.net, self.last), TAG_TOP, self.rank + 1, "a top-down message")
        out = self.stage.prepare(self.net, self.nodes, top)
        if self.rank > 0:
            self._send(out, self.rank - 1, TAG_TOP, self.net.steps)

    def _top_down(self, t: int, send: bool = True) -> None:
        """Ready this rank's nodes for step t from the next rank's top-down message and send
        its own to the previous rank. The message read is the one the next rank sent before
        its step max(0, t - staleness): in sync mode (staleness 0) this waits for every later
        rank to finish step t-1, which serialises the pipeline but equals one process; in
        async mode a rank reads messages staleness steps old, so it never waits on the next
        rank's current step, and what it reads through j boundaries is up to j·staleness old."""
        top = None
        if self.has_next:
            if send:
                buf = torch.empty(self.stage.top_shape(self.net, self.last), dtype=next(self.net.parameters()).dtype,
                                  device=self.device)
                work = self._guard(lambda: dist.irecv(buf, self.rank + 1, tag=TAG_TOP), self.rank + 1, "a receive")
                self.tops[t] = [buf, work]
            j = max(0, t - self.delay)
            self._arrived(self.tops[j], "a top-down message")
            top = self.tops[j][0]
            for old in [i for i in self.tops if i < j]:
                del self.tops[old]
        out = self.stage.prepare(self.net, self.nodes, top)
        if self.rank > 0 and send:
            self._send(out, self.rank - 1, TAG_TOP, t)

    def flush(self) -> None:
        """Wait until every send and every posted receive of this rank has completed."""
        self._reap(math.inf)
        for entry in [*self.pending.values(), *self.tops.values()]:
            self._arrived(entry)

    def finish(self) -> None:
        """At the end of training: absorb every outstanding backward message, wait for the
        sends and the top-down messages."""
        self._absorb(upto=math.inf)
        self.flush()

    # ---- the other ranks' nodes ----------------------------------------------------------
    def _release(self) -> None:
        """Free the storage of every node this rank does not train (parameters, buffers,
        heads and the rule's state for it), so that a rank holds only its own part of the
        model; the tensors stay (empty) where optimizers and modules refer to them."""
        owned = set(self.nodes)
        for k, node in enumerate(self.net.nodes):
            if k in owned:
                continue
            for t in [*node.parameters(), *node.buffers(), *self.stage.node_state(self.net, k)]:
                if t.numel():
                    self.released.append((t, t.shape))
                    t.data = t.data.new_empty(0)

    def _restore(self) -> None:
        """Give the released tensors their shapes back, filled with zeros."""
        for t, shape in self.released:
            t.data = t.data.new_zeros(shape)
        self.released = []

    @contextlib.contextmanager
    def whole(self):
        """Within the block the network has every tensor's shape (the other ranks' nodes as
        zeros), as a checkpoint needs; this rank's own part is untouched."""
        self._restore()
        try:
            yield self.net
        finally:
            self._release()

    # ---- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the network: the partition and the outputs still
        waiting to absorb their backward message, with the messages (received now, not
        absorbed, so that a resumed run absorbs them at the same step as an uninterrupted one),
        and the top-down messages later steps will read."""
        self.flush()
        steps, tops = sorted(self.pending), sorted(self.tops)
        return {"partition": torch.tensor(self.counts), "pending_steps": torch.tensor(steps, dtype=torch.int64),
                **{f"pending_{name}": [self.pending[j][i] for j in steps] for i, name in enumerate(("h", "y", "back"))},
                "top_steps": torch.tensor(tops, dtype=torch.int64), "top_messages": [self.tops[j][0] for j in tops]}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` (the partition must be this pipeline's)."""
        if state["partition"].tolist() != self.counts:
            raise ValueError(f"the checkpoint was written with partition {state['partition'].tolist()}, "
                             f"this run has {self.counts}")
        for j, h, y, back in zip(state["pending_steps"].tolist(), state["pending_h"], state["pending_y"],
                                 state["pending_back"]):
            self.pending[j] = [h.to(self.device), y.to(self.device), back.to(self.device), None]
        # checkpoints written before top-down messages existed have none
        for j, top in zip(state.get("top_steps", torch.zeros(0)).tolist(), state.get("top_messages", [])):
            self.tops[j] = [top.to(self.device), None]

    def gather(self) -> None:
        """Every rank gets every node's parameters and buffers (heads included) from its owner;
        the network is whole again afterwards (the rule's state for other ranks' nodes is zero)."""
        self._restore()
        for k, node in enumerate(self.net.nodes):
            for t in node.state_dict().values():
                if isinstance(t, torch.Tensor):
                    self._guard(lambda: dist.broadcast(t, src=self.owner(k)), self.owner(k), f"node {k}'s state")

    # ---- point to point ------------------------------------------------------------------
    def _expect_back(self, step: int, h: torch.Tensor, y: torch.Tensor) -> None:
        """Post the receive of step's backward message now, so that the sender never waits
        for this rank to reach the step that absorbs it."""
        back = torch.empty(len(y), dtype=h.dtype, device=self.device)
        work = self._guard(lambda: dist.irecv(back, self.rank + 1, tag=TAG_BACK), self.rank + 1, "a receive")
        self.pending[step] = [h, y, back, work]

    def _arrived(self, entry: list, what: str = "a backward message") -> None:
        """Wait for the posted receive of an entry whose last item is its work (None once arrived)."""
        if entry[-1] is not None:
            start = time.perf_counter()
            self._guard(entry[-1].wait, self.rank + 1, what)
            self.wait_seconds += time.perf_counter() - start
            entry[-1] = None

    def _absorb(self, upto: float) -> None:
        for j in sorted(self.pending):
            if j > upto:
                break
            entry = self.pending.pop(j)
            self._arrived(entry)
            self.stage.absorb(self.net, self.last, entry[0], entry[1], entry[2], j)

    def _send(self, t: torch.Tensor, dst: int, tag: int, step: int) -> None:
        t = t.contiguous()  # the very tensor sent must live until the send completes
        work = self._guard(lambda: dist.isend(t, dst, tag=tag), dst, "a send")
        self.sends.append((step, work, t))

    def _reap(self, step: float) -> None:
        """Wait for sends of steps before step-1: at most two steps of messages in flight."""
        while self.sends and self.sends[0][0] < step - 1:
            _, work, _ = self.sends.pop(0)
            self._guard(work.wait, None, "a send to complete")

    def _recv(self, shape, tag: int, src: int, what: str) -> torch.Tensor:
        t = torch.empty(shape, dtype=next(self.net.parameters()).dtype, device=self.device)
        start = time.perf_counter()
        self._guard(lambda: dist.recv(t, src, tag=tag), src, what)
        self.wait_seconds += time.perf_counter() - start
        return t

    def _guard(self, fn, peer: int | None, what: str):
        try:
            return fn()
        except (RuntimeError, dist.DistError) as exc:
            who = "a peer rank" if peer is None else f"rank {peer}"
            raise DistributedError(f"rank {self.rank}: waiting for {what} from {who} failed at step "
                                   f"{self.net.steps} (timeout {self.timeout:g} s): {who} died, hung or closed "
                                   f"the connection ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc


# ---- process groups and local launch ---------------------------------------------------
def init_from_env(timeout: float, device_type: str = "cpu") -> tuple[int, int]:
    """Join the process group that RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT describe
    (as torchrun sets them): gloo on CPU, NCCL on CUDA. Returns (rank, world size).

    Joining is bounded by ``timeout`` seconds whatever the peer does: a store client that
    reaches a port held by another program (not a rendezvous store) waits for its handshake
    forever, whatever timeout torch is given (seen: over 120 s). So a watchdog ends this
    process with a clear message if the group is not joined in time."""
    backend, rank = ("nccl" if device_type == "cuda" else "gloo"), os.environ.get("RANK", "?")
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    joined = threading.Event()

    def watchdog() -> None:
        if not joined.wait(timeout):
            print(f"rank {rank}: could not join the {backend} process group at {where} within {timeout:g} s "
                  f"(is the port taken by another program, or did rank 0 fail?)", file=sys.stderr, flush=True)
            os._exit(3)

    threading.Thread(target=watchdog, daemon=True, name="localprop-join-watchdog").start()
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError, dist.DistError) as exc:
        raise DistributedError(f"rank {rank}: could not join the {backend} process group at {where} within "
                               f"{timeout:g} s ({exc})") from exc
    finally:
        joined.set()
    return dist.get_rank(), dist.get_world_size()


def all_ranks(value: Any, what: str) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; every rank calls it. A peer that
    died or hung is a DistributedError naming ``what`` was being exchanged."""
    gathered: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(gathered, value)
    except (RuntimeError, dist.DistError) as exc:
        raise DistributedError(f"rank {dist.get_rank()}: exchanging {what} failed: a rank died or hung "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    return gathered


def agree(facts: dict[str, Any]) -> None:
    """Check that every rank was started with the same ``facts`` (JSON-like: the config,
    a digest of the data, the partition, ...); raise DistributedError naming the first
    key that differs, with rank 0's value and the other rank's. Every rank calls it."""
    gathered = all_ranks(facts, "the ranks' configurations")
    for r, theirs in enumerate(gathered):
        diff = _first_difference(gathered[0], theirs)
        if diff is not None:
            key, mine, other = diff
            raise DistributedError(f"ranks disagree on {key}: rank 0 has {mine!r}, rank {r} has {other!r}; every "
                                   f"rank must be started with the same configuration, data and command line")


def _first_difference(a: Any, b: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, a's value, b's value) of the first place where a and b differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            diff = _first_difference(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
            if diff is not None:
                return diff
        return None
    return None if a == b else (key or "the configuration", a, b)


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stopped(RuntimeError):
    """The launcher was told to stop (SIGTERM, SIGINT, SIGHUP) and stopped its ranks."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; every rank was stopped")
        self.signum = signum


def launch(argv: list[str], ranks: int, grace: float = 5.0) -> int:
    """Run ``python -m localprop <argv>`` as ``ranks`` local processes of one gloo group on
    localhost. When a rank exits with an error, the others are terminated (SIGTERM, then
    SIGKILL after ``grace`` seconds) and a DistributedError names the first rank that
    failed: ranks are watched in the order they exit, since a rank killed from outside takes
    its peers down with it within moments (gloo may abort them), and a poll of all exit codes
    could find the consequence first. Returns 0.

    No rank outlives the launcher: SIGTERM, SIGINT or SIGHUP to it stops every rank (then
    :class:`Stopped` is raised), and if it is killed outright (SIGKILL), the kernel sends
    each rank SIGTERM (Linux's parent-death signal)."""
    env = {**os.environ, "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    exits: queue.Queue[tuple[int, int]] = queue.Queue()
    previous = _raise_on_signals()
    procs: list[subprocess.Popen] = []
    try:
        for r in range(ranks):
            procs.append(subprocess.Popen([sys.executable, "-m", "localprop", *argv], preexec_fn=_die_with(os.getpid()),
                                          env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}))
            threading.Thread(target=lambda r=r, p=procs[-1]: exits.put((r, p.wait())), daemon=True).start()
        for _ in procs:
            r, code = exits.get()
            if code != 0:
                why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                raise DistributedError(f"rank {r} of {ranks} stopped with {why}; the other ranks were stopped")
        return 0
    finally:
        for s in previous:  # a second signal must not interrupt the stopping of the ranks
            signal.signal(s, signal.SIG_IGN)
        _stop(procs, grace)
        for s, handler in previous.items():
            signal.signal(s, handler)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _raise_on_signals() -> dict:
    """Make the stop signals raise :class:`Stopped` in the main thread (by default SIGTERM
    and SIGHUP end the process at once, without the ``finally`` that stops the ranks);
    returns the previous handlers. Outside the main thread signals cannot be handled, and
    nothing is changed."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        raise Stopped(signum)

    return {s: signal.signal(s, handler) for s in _STOP_SIGNALS}


def _die_with(parent: int):
    """A preexec_fn: the child gets SIGTERM when the launcher dies, however it dies
    (prctl PR_SET_PDEATHSIG, Linux), and exits at once if it died already. The libc
    handle is taken here, in the parent: a child forked from a threaded parent must not
    import or allocate before exec."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes
        prctl = ctypes.CDLL(None).prctl

    def arm() -> None:
        if prctl is not None:
            prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)
    return arm


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
        p.send_signal(signal.SIGCONT)  # a stopped (SIGSTOP) rank acts on SIGTERM only once continued
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
