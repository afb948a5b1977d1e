"""LocProp: local propagation of error vectors over a graph of nodes.

The seed paper ("Network Learning with Local Propagation", Kostadinov et al.) gives three
elements — nonlinear transforms at every node, a local objective per node, and a local
propagation model relating each node's nonlinear error vector to the goal error vectors of
its directly connected nodes. Its equations could not be read; the formulation below is
this library's own (see METHODS.md, "locprop"):

    z_k = Σ_{j ∈ in(k)} W_kj h_j + b_k,   h_k = σ_k(z_k)                  (transforms)
    goal nodes:   L_k = ℓ_k(h_k, y_k);   hidden nodes:  L_k = ½ Σ_b ‖h_k − t_k‖²   (objectives)
    g_k = ∂L_k/∂h_k,   ε_k = g_k ⊙ σ_k'(z_k)                            (goal / nonlinear error)
    t_j = h_j − η Σ_{k ∈ out(j)} P_kj(ε_k)                              (propagation)
    update θ_k from L_k alone: ∇_W L_k = ε_kᵀ h_in

P_kj(ε) is ε W_kj ("transpose"), ε B_kj with a fixed random B_kj ("feedback": no weight
transport), or ε Q_kj with Q_k learned as a linear inverse of the node, min ½‖h_k Q_k − u_k‖²
("inverse", the target-propagation reading). With "transpose" and η = 1 one sync step
changes the parameters exactly as one backprop step: backprop is a special case.

Modes:
- "sync": forward over the graph, then error vectors top-down, each node updating once
  its error is known. Activations are kept for the step; no autograd graph is built.
- "decoupled": hidden nodes' goals come from the goal nodes' targets alone, through the
  propagation maps, so a node updates as soon as its own forward is done and nothing
  deeper is waited for; step memory does not grow with depth. A goal's target is coded
  per sample as c = onehot(y) − 1/C (cross-entropy) or y itself (mse) and carried to node
  j by the composite map M_j = Σ_k M_k P_kj (M_goal = I), scaled to unit RMS so that
  every node's goal has the size of an activation: the representation goal
  ĉ_j = Σ_goals c M_j. The node then moves toward it,
      t_j = h_j − η (h_j − ĉ_j),   L_j = ½ mean_b ‖h_j − t_j‖² / η,
  i.e. g_j = η (h_j − ĉ_j) / B, with its own σ'. (The library's formulation: local
  representation goals in the spirit of the seed's companion paper, a chained form of
  direct target projection with a fixed point.) The maps are rule state, refreshed each
  step for "transpose" and "inverse" and fixed for "feedback".
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools

import torch
from torch import nn

from ..errors import check_bool, check_choice, check_finite, check_float, check_int
from .. import objectives
from ..topology import Topology, gather, goal_loss
from .base import Messages, NodeStep, Rule, StepResult

PROPAGATIONS = ("transpose", "feedback", "inverse")
MODES = ("sync", "decoupled")


class LocProp(Rule):
    """Local propagation (see the module docstring for the formulation).

    Args:
        propagation: "transpose" | "feedback" | "inverse", the maps P_kj.
        eta: η > 0, the step of the local goals t_j = h_j − η Σ P_kj(ε_k). Default: 1 in
            sync mode (backprop's special case); 0.1 in decoupled mode, where η scales a
            regression of every hidden node toward its goal: at 1 it diverged on digits
            after 5 epochs (SGD lr 0.05, momentum 0.9, width 256), at 0.1 it reached 98%
            (feedback) and 94% (transpose) after 20.
        mode: "sync" | "decoupled".
        concurrent: in decoupled mode, overlap each node's update with the next node's
            forward (a worker thread on CPU, a side CUDA stream on GPU).
        inverse_lr: step in (0, 2) of the inverse maps' normalised least-squares update
            ("inverse" only).
        seed: seed of the fixed random feedback maps, an int >= 0.
    """

    name = "locprop"
    graphs = True

    def __init__(self, propagation: str = "transpose", eta: float | None = None, mode: str = "sync",
                 concurrent: bool = False, inverse_lr: float = 0.5, seed: int = 0) -> None:
        self.propagation = check_choice("LocProp", "propagation", propagation, PROPAGATIONS)
        self.mode = check_choice("LocProp", "mode", mode, MODES)
        self.eta = (1.0 if mode == "sync" else 0.1) if eta is None else \
            check_float("LocProp", "eta", eta, 0, open_low=True)
        self.concurrent = check_bool("LocProp", "concurrent", concurrent)
        self.inverse_lr = check_float("LocProp", "inverse_lr", inverse_lr, 0, 2, open_low=True, open_high=True)
        self.seed = check_int("LocProp", "seed", seed, 0)

    def __repr__(self) -> str:
        return f"LocProp(propagation={self.propagation!r}, eta={self.eta}, mode={self.mode!r})"

    # ---- state ------------------------------------------------------------------------
    def attach(self, net) -> None:
        """Check that every node is a fused linear node and build the maps: fixed random
        B_k (feedback), learned Q_k (inverse), and in decoupled mode
        (decoupled mode, on the first batch) the composite maps M, one [C_goal, N_j]
        buffer per goal and upstream node."""
        topo = net.topology()
        for node in topo.order:
            if not getattr(node, "fused", False):
                raise ValueError(f"node {node.name}: locprop needs LocalLinear nodes (it propagates error "
                                 f"vectors through their weights), got {type(node).__name__}")
        for goal in topo.goals.values():
            objective = goal.objective
            if type(objective) not in (objectives.CrossEntropy, objectives.MSE) or \
                    getattr(objective, "ignore_index", None) not in (None, objectives.IGNORE_INDEX):
                raise ValueError(f"goal {goal.node!r}: locprop's error vectors are derived for cross-entropy "
                                 f"and mse, not loss {objective.name!r}")
        state = nn.Module()
        state.maps = nn.ParameterDict()
        gen = torch.Generator().manual_seed(self.seed)
        for node in topo.order:
            w = node.weight
            if self.propagation == "feedback":
                bound = 1 / w.shape[1] ** 0.5  # nn.Linear's scale, so messages match transpose's size
                b = (torch.rand(w.shape, generator=gen, dtype=w.dtype) * 2 - 1) * bound
                state.maps[node.name] = nn.Parameter(b.to(w.device), requires_grad=False)
            elif self.propagation == "inverse":
                state.maps[node.name] = nn.Parameter(w.detach().clone())
        # decoupled mode: composite maps, derived from the maps (so not saved), filled on
        # the first batch once the graph inputs' widths are known
        state.composite = {}
        state.composite_version = None
        net.rule_state = state

    def node_parameters(self, node):
        return [node.weight] + ([node.bias] if node.bias is not None else [])

    def _map(self, net, node) -> torch.Tensor:
        """P_k as a matrix [N_k, K_k]: P_kj(ε) = ε P_k[:, cols of j]."""
        return node.weight if self.propagation == "transpose" else net.rule_state.maps[node.name]

    @torch.no_grad()
    def _composite(self, net, topo: Topology, goal: str, widths: dict[str, int]) -> dict[str, torch.Tensor]:
        """M_j [C, N_j] for every node upstream of ``goal`` (M_goal = I, M_j = Σ_k M_k P_kj),
        each scaled to unit RMS before it is carried further up, so that a deep chain's
        product of maps neither underflows nor overflows (unscaled, it reached 0 in float32
        within ~100 nodes of the goal on a chain of width 24)."""
        node = net_node(topo, goal)
        out: dict[str, torch.Tensor] = {goal: torch.eye(node.weight.shape[0], dtype=node.weight.dtype,
                                                        device=node.weight.device)}
        for k in reversed(topo.order):
            if k.name not in out:
                continue
            if k.name != goal:
                out[k.name] = out[k.name] / out[k.name].square().mean().sqrt().clamp_min(1e-12)
            spread = out[k.name] @ self._map(net, k)
            for j, part in zip(topo.inputs[k.name], self._split(topo, k, spread, widths)):
                if part is not None:
                    out[j] = out[j] + part if j in out else part
        return out

    def _refresh_composite(self, net, topo: Topology, widths: dict[str, int]) -> None:
        """Recompute the composite maps in place: every step for transpose and inverse,
        whose maps learn; for the fixed feedback maps only when they were written to
        (e.g. by load_state_dict), which their version counters tell."""
        state = net.rule_state
        if self.propagation == "feedback":
            version = sum(b._version for b in state.maps.values())
            if state.composite and version == state.composite_version:
                return
            state.composite_version = version
        for goal in topo.goals:
            for name, m in self._composite(net, topo, goal, widths).items():
                key = f"{goal}__{name}"
                if key in state.composite:
                    state.composite[key].copy_(m)
                else:
                    state.composite[key] = m

    @staticmethod
    def _split(topo: Topology, node, message: torch.Tensor, widths: dict[str, int]) -> list[torch.Tensor | None]:
        """Columns of a message [*, K_k] per input of the node; None for graph inputs."""
        nodes = {n.name for n in topo.order}
        parts, start = [], 0
        for name in topo.inputs[node.name]:
            parts.append(message[:, start:start + widths[name]] if name in nodes else None)
            start += widths[name]
        return parts

    @staticmethod
    def _widths(topo: Topology, feeds: dict[str, torch.Tensor]) -> dict[str, int]:
        """Feature width of every name: the graph inputs' from the batch, the nodes' N_k."""
        return {**{name: t.shape[1] for name, t in feeds.items()},
                **{n.name: n.weight.shape[0] for n in topo.order}}

    # ---- steps --------------------------------------------------------------------------
    @torch.no_grad()  # the whole rule is BP-free: no autograd graph is ever recorded
    def train_step(self, net, x, y, step):
        topo = net.topology()
        feeds, targets = net.feeds(x, y)
        if self.mode == "sync":
            return self._sync_step(net, topo, feeds, targets, step)
        return self._decoupled_step(net, topo, feeds, targets, step)

    def _goal(self, node, topo, h, aux, target, with_message: bool):
        """(loss, ∂ℓ/∂h, ε or None, message or None) of a goal node."""
        goal = topo.goals[node.name]
        if goal.objective.name == "cross_entropy":
            out = node.goal_error(h, aux, target, with_message)
            return out.loss, out.dlogits, out.err, out.message
        loss = goal_loss("mse", h, target)
        return loss, (h - target) * (2 / h.numel()), None, None

    def _sync_step(self, net, topo: Topology, feeds, targets, step) -> StepResult:
        widths, nodes = self._widths(topo, feeds), {n.name for n in topo.order}
        values, kept = dict(feeds), {}
        for node in topo.order:
            u = gather(topo, node.name, values)
            values[node.name], aux = node.transform(u)
            kept[node.name] = (u, aux)
        incoming: dict[str, torch.Tensor] = {}
        losses = {}
        for node in reversed(topo.order):
            u, aux = kept.pop(node.name)
            h = values.pop(node.name)
            g = incoming.pop(node.name, None)
            err = message = None
            if g is not None:
                g.mul_(self.eta)
                losses[node.name] = 0.5 * (g * g).sum()  # ½‖h − t‖² with h − t = η Σ P(ε)
            sends = any(i in nodes for i in topo.inputs[node.name])
            if node.name in topo.goals:
                # a goal that hears from no successor: ε and ε W from the one fused op
                plain = g is None and self.propagation == "transpose"
                loss, dl, err, message = self._goal(node, topo, h, aux, targets[topo.goals[node.name].target],
                                                    plain and sends)
                losses[node.name] = loss
                g = dl if g is None else g.add_(dl)
                if not plain:
                    err = message = None
            self._check(net, node, losses[node.name], step)
            if err is None:
                err = node.error(g, h, aux)
            if message is None and sends:
                message = err @ self._map(net, node)
            if message is not None:
                for j, part in zip(topo.inputs[node.name], self._split(topo, node, message, widths)):
                    if part is not None:
                        incoming[j] = incoming[j].add_(part) if j in incoming else part.clone()
            self._learn_inverse(net, node, u, h, step)
            node.apply_error(u, err, step)
        return StepResult(step, {name: float(v) for name, v in reversed(losses.items())})

    def _decoupled_step(self, net, topo: Topology, feeds, targets, step) -> StepResult:
        self._refresh_composite(net, topo, self._widths(topo, feeds))
        codes = {g: self._code(topo, g, targets[goal.target]) for g, goal in topo.goals.items()}
        values, left = dict(feeds), {name: len(readers) for name, readers in topo.consumers.items()}
        losses = {}
        with _Overlap(self.concurrent, next(iter(feeds.values())).device) as overlap:
            for node in topo.order:
                u = gather(topo, node.name, values)
                for i in topo.inputs[node.name]:  # free inputs once their last reader has them
                    left[i] -= 1
                    if left[i] == 0:
                        del values[i]
                h, losses[node.name] = self._decoupled_node(net, topo, node, u, codes, targets, step, overlap.run)
                if node.name in topo.consumers:
                    values[node.name] = h
        return StepResult(step, {name: float(v) for name, v in losses.items()})

    def _decoupled_node(self, net, topo: Topology, node, u: torch.Tensor, codes, targets, step: int, run):
        """One node's decoupled step: its forward, its goal error from the label codes (and
        its own loss if it is a goal), then its update through ``run(apply_error, u, err)``.
        Returns (h, its local loss)."""
        h, aux = node.transform(u)
        g = self._hidden_goal_error(net, node, h, codes)
        loss = None if g is None else 0.5 * len(h) * (g * g).sum() / self.eta
        if node.name in topo.goals:
            loss, dl, _, _ = self._goal(node, topo, h, aux, targets[topo.goals[node.name].target], False)
            g = dl if g is None else g.add_(dl)
        if g is None:
            raise ValueError(f"node {node.name}: no goal is downstream of it, so it has no error")
        self._check(net, node, loss, step)
        self._learn_inverse(net, node, u, h, step)
        run(functools.partial(node.apply_error, step=step), u, node.error(g, h, aux))
        return h, loss

    @torch.no_grad()
    def chain_composites(self, net, top: torch.Tensor | None, nodes: range) -> torch.Tensor | None:
        """Decoupled mode on a chain, for a pipeline stage that owns ``nodes``: set their
        composite maps from ``top`` = M_last [C, N_last], made by the next stage from its
        own first node's map (None when ``nodes`` end at the goal, whose M is I), as
        :meth:`_refresh_composite` would: M_{k-1} = M_k P_k scaled to unit RMS.
        Returns M_{first-1} [C, N_{first-1}], the message for the previous stage (None
        when ``nodes`` start at node 0)."""
        goal = net.nodes[-1]
        m = torch.eye(goal.weight.shape[0], dtype=goal.weight.dtype, device=goal.weight.device) \
            if top is None else top
        for k in reversed(nodes):
            net.rule_state.composite[f"{goal.name}__{net.nodes[k].name}"] = m
            if k == 0:
                return None
            m = m @ self._map(net, net.nodes[k])
            m = m / m.square().mean().sqrt().clamp_min(1e-12)
        return m

    @torch.no_grad()
    def node_step(self, net, k: int, u: torch.Tensor, y: torch.Tensor, message, step: int) -> NodeStep:
        """Node k's decoupled step on a chain, alone: what a pipeline stage runs, once
        :meth:`prepare` has set node k's composite map for this step (``message`` unused).
        u: [B, K] node k's input; y: int64 [B]. Returns NodeStep(h [B, N], its local loss)."""
        if self.mode != "decoupled":
            raise ValueError(f"LocProp.node_step runs decoupled LocProp only, not {self!r}")
        topo = net.topology()
        _, targets = net.feeds(u, y)
        codes = {g: self._code(topo, g, targets[goal.target]) for g, goal in topo.goals.items()}
        return NodeStep(*self._decoupled_node(net, topo, topo.order[k], u, codes, targets, step,
                                              lambda fn, *a: fn(*a)))

    # in a pipeline: a node's goal is the labels' code through its composite map, which
    # chains through the maps of every later node; learned maps (transpose: the weights;
    # inverse) change every step, so the composite at a stage's first node travels back
    # every step, [classes, N]; fixed feedback maps never change: once, at the start
    @property
    def messages(self) -> Messages:
        return Messages(top_down="once" if self.propagation == "feedback" else "step")

    def not_decoupled(self) -> str | None:
        if self.mode == "decoupled":
            return None
        return (f"rule {self.name!r} in sync mode needs global backpropagation of top-down error vectors through "
                f"every node at every step, so its nodes cannot update apart: use mode='decoupled' to train it "
                f"distributed, or train it in one process")

    def prepare(self, net, nodes, top):
        return {}, self.chain_composites(net, top, nodes)

    def top_shape(self, net, last):  # from the nodes' shapes: later nodes' weights may be released
        return net.nodes[-1].output_shape[0], net.nodes[last].output_shape[0]

    def node_state(self, net, k):
        maps = net.rule_state.maps
        return [maps[net.nodes[k].name]] if net.nodes[k].name in maps else []

    @staticmethod
    def _code(topo, goal: str, target: torch.Tensor) -> torch.Tensor:
        """The goal's target coded per sample, c [B, C]: onehot(y) − 1/C, or y for mse."""
        node = net_node(topo, goal)
        if topo.goals[goal].objective.name == "cross_entropy":
            c = node.output_shape[0]  # not the weight's: in a pipeline another rank may hold it
            return torch.nn.functional.one_hot(target.long(), c).to(node.weight.dtype) - 1.0 / c
        return target

    def _hidden_goal_error(self, net, node, h: torch.Tensor, codes) -> torch.Tensor | None:
        """g_j = η (h_j − ĉ_j) / B with ĉ_j = Σ_goals c M_goal,j, for a node upstream of a
        goal (None for a node that is only a goal)."""
        goal_code = None
        for goal, c in codes.items():
            key = f"{goal}__{node.name}"
            if goal != node.name and key in net.rule_state.composite:
                part = c @ net.rule_state.composite[key]
                goal_code = part if goal_code is None else goal_code.add_(part)
        return None if goal_code is None else (h - goal_code).mul_(self.eta / len(h))

    def _learn_inverse(self, net, node, u: torch.Tensor, h: torch.Tensor, step: int) -> None:
        """One normalised least-mean-squares step of Q_k on ½ ‖h_k Q_k − u_k‖² (inverse
        propagation only): Q −= lr hᵀ(h Q − u) / ‖h‖², stable for any lr in (0, 2)
        whatever the size of the activations, which plain SGD on Q was not."""
        if self.propagation != "inverse":
            return
        q = net.rule_state.maps[node.name]
        q.sub_(h.t() @ (h @ q - u), alpha=self.inverse_lr / (h.square().sum().item() + 1e-12))
        node.check_update([q], step, owner=net.rule_state)

    @staticmethod
    def _check(net, node, loss: torch.Tensor, step: int) -> None:
        if net.check_finite:
            check_finite(loss, node.name, step, "loss")


def net_node(topo: Topology, name: str):
    return next(n for n in topo.order if n.name == name)


class _Overlap(contextlib.AbstractContextManager):
    """Runs node updates beside the forward of the next node: on a worker thread for CPU
    tensors (torch releases the GIL in its kernels), on a side stream for CUDA tensors;
    inline when disabled. Leaving the block waits for every update (and re-raises)."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled, self.device = enabled, device
        self.pool = self.stream = None
        self.futures: list[concurrent.futures.Future] = []

    def __enter__(self):
        if self.enabled and self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
        elif self.enabled:
            self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        return self

    def run(self, fn, u: torch.Tensor, err: torch.Tensor) -> None:
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                fn(u, err)
            u.record_stream(self.stream)  # keep u and err alive until the side stream is done
            err.record_stream(self.stream)
        elif self.pool is not None:
            self.futures.append(self.pool.submit(fn, u, err))
        else:
            fn(u, err)

    def __exit__(self, *exc):
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            for f in self.futures:
                f.result()
        return False
