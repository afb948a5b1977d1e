"""One rank's stage of the decoupled pipeline: the schedule, the point-to-point messages
and their pending work, the release of the other ranks' nodes, and what a checkpoint
needs (see the package's docstring)."""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from typing import Any

import torch
import torch.distributed as dist

from .. import memory
from ..engine import LocalSequential
from ..errors import check_finite
from ..topology import goal_loss
from .errors import DistributedError
from .stages import stage_for

TAG_H, TAG_MESSAGE, TAG_BACK, TAG_GRAD, TAG_TOP = 1, 2, 3, 4, 5


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


def check_standalone(net) -> None:
    """Every node must take only the activation: values a traced model passes beside it
    (keyword inputs, positions, masks: see localprop.trace) do not cross processes. A
    network without standalone nodes (localize(hooks=True)) says so from topology()."""
    for node in net.topology().order:
        extra = getattr(node, "reads", ()) + getattr(node, "writes", ())
        if extra or net.input_names:
            what = ", ".join(map(repr, extra or net.input_names))
            raise ValueError(f"node {node.name}: the model passes {what} between its nodes besides the activation, "
                             f"which the pipeline across processes does not carry; train it in one process")


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
        check_standalone(net)
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
