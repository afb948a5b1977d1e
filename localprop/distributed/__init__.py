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

from .errors import DistributedError, NotDecoupled
from .launch import Stopped, agree, all_ranks, free_port, init_from_env, launch
from .partition import node_costs, node_flops, partition
from .pipeline import Pipeline, check_standalone, step_memory
from .stages import Stage, stage_for

__all__ = ["DistributedError", "NotDecoupled", "Stopped", "Pipeline", "Stage", "agree", "all_ranks",
           "check_standalone", "free_port", "init_from_env", "launch", "node_costs", "node_flops", "partition", "stage_for", "step_memory"]
