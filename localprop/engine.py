"""The engine's chain: LocalSequential, a chain of nodes trained by a rule.

It holds the nodes, validates batches, builds heads (and, through Network, the rule's
state and per-node optimizers) once shapes are known, and hands each step to the rule.
It knows nothing of any rule's objective, messages or schedule. Inference extras that
use per-node heads live here: progressive prediction, ensembles, sub-models.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from . import heads, rules
from .errors import LABEL_DTYPE_NAMES, LABEL_DTYPES, check_finite
from .network import DEFAULT_OPTIMIZER, Network, OptimizerFactory
from .nodes import ModuleNode, Node, check_distinct
from .topology import Goal, Topology

__all__ = ["LocalSequential", "Prediction", "Flops", "DEFAULT_OPTIMIZER", "OptimizerFactory"]


@dataclass
class Prediction:
    """What :meth:`LocalSequential.predict` returns."""
    labels: torch.Tensor     #: int64 [B] predicted class
    exit_node: torch.Tensor  #: int64 [B] index of the node whose head answered (the last: the main output)
    #: FLOPs spent per sample, averaged over the batch, as a fraction of one full forward
    #: pass through every node (heads not counted in the denominator; those evaluated on
    #: the way are counted in the numerator, so an ensemble costs more than 1)
    flops_fraction: float = 1.0
    #: [B, C] with ``ensemble=True``: the sum of the heads' and the main output's softmax
    scores: torch.Tensor | None = None


@dataclass
class Flops:
    """Forward FLOPs per sample of each node and of each node's head (0 without one)."""
    nodes: list[int]
    heads: list[int]

    @property
    def full(self) -> int:
        """One forward pass of the whole chain, heads excluded."""
        return sum(self.nodes)


class LocalSequential(Network):
    """A chain of nodes trained by a local learning rule (or by backprop, for comparison).

    Args:
        *nodes: :class:`~localprop.LocalLinear` nodes or any ``nn.Module`` blocks (wrapped in
            :class:`~localprop.nodes.ModuleNode`). The last node's output is the logits [B, C].
        rule: a rule name ("bp", "bp+checkpoint", "greedy", ...) or a :class:`~localprop.rules.Rule`.
        num_classes: C, number of classes of the labels.
        optimizer: factory ``params -> torch.optim.Optimizer``; each node gets its own
            (default SGD lr=0.05, momentum=0.9).
        backend: backend of the fused ops: "reference", "cpp", "triton", "cuda" or "auto"
            (default: $LOCALPROP_BACKEND, else "auto").
        check_finite: raise FloatingPointError on a non-finite input or loss (default True).

    Networks whose nodes all have known shapes (LocalLinear) are built at once; others
    are built by :meth:`build` or on the first batch, by a dry run.
    """

    def __init__(self, *nodes: nn.Module, rule: str | rules.Rule = "greedy", num_classes: int,
                 optimizer: OptimizerFactory | None = None, backend: str | None = None,
                 check_finite: bool = True) -> None:
        super().__init__(rule, optimizer, backend, check_finite)
        if not nodes:
            raise ValueError("LocalSequential needs at least one node")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        check_distinct([(str(k), n) for k, n in enumerate(nodes)])
        self.nodes = nn.ModuleList(n if isinstance(n, Node) else ModuleNode(n) for n in nodes)
        for k, node in enumerate(self.nodes):
            node.name = str(k)
        self.num_classes = num_classes
        self._topology: Topology | None = None
        self._flops: Flops | None = None
        if all(n.input_shape is not None for n in self.nodes):
            self._check_chain()
            self._finish_build()

    # ---- building -----------------------------------------------------------------
    def build(self, example: torch.Tensor) -> LocalSequential:
        """Find every node's shapes by a dry run on ``example`` [B, ...] (no gradients,
        eval mode, parameters untouched), then build heads and optimizers."""
        if self.built:
            return self
        with _eval_mode(self), torch.no_grad():
            h = example[:2]
            for node in self.nodes:
                node.input_shape = tuple(h.shape[1:])
                h = node(h)
                node.output_shape = tuple(h.shape[1:])
        self._finish_build()
        return self

    def _check_chain(self) -> None:
        for prev, node in zip(self.nodes, self.nodes[1:]):
            if prev.output_shape != node.input_shape:
                raise ValueError(f"node {node.name}: expects inputs of shape {list(node.input_shape)}, "
                                 f"but node {prev.name} outputs {list(prev.output_shape)}")

    def _finish_build(self) -> None:
        last = self.nodes[-1]
        if last.output_shape != (self.num_classes,):
            raise ValueError(f"node {last.name}: the last node must output the logits, shape "
                             f"[{self.num_classes}] per sample for num_classes={self.num_classes}, "
                             f"got {list(last.output_shape)}")
        for node in self.nodes:
            if self.rule.uses_heads and node is not last:
                like = next(node.parameters(), None)  # heads live where the node lives, in its dtype
                head = heads.default_head(node.output_shape, self.num_classes)
                node.head = head if like is None else head.to(device=like.device, dtype=like.dtype)
        self._attach()

    # ---- training -----------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> rules.StepResult:
        """Train every node once on the batch x: [B, ...] float, y: [B] integer labels in
        [0, num_classes) (int64, or int32/int16/int8/uint8, which train exactly as their
        int64 values). Returns the per-node losses (a StepResult)."""
        self._validate_x(x)
        y = self._validate_y(x, y)
        if not self.built:
            self.build(x)
        return self._step(x, y, x.device)

    def topology(self) -> Topology:
        """The chain as a graph: node k reads node k-1 (node 0 reads "x"); the last node
        is the goal, cross-entropy against "y". Built once: the chain never changes, and
        rules ask for it several times a step."""
        if self._topology is None:
            names = [n.name for n in self.nodes]
            inputs = {name: [prev] for prev, name in zip(["x"] + names, names)}
            self._topology = Topology(list(self.nodes), inputs, {names[-1]: Goal(names[-1], "y")})
        return self._topology

    def feeds(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, dict]:
        """The batch as graph rules see it: ({"x": x}, {"y": y})."""
        return {"x": x}, {"y": y}

    def _validate_x(self, x: torch.Tensor) -> None:
        """x must be a non-empty float batch [B, *input shape] on the nodes' device and in
        their dtype, and (check_finite on) finite; training and inference alike."""
        first = self.nodes[0]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"node {first.name}: x must be a floating-point tensor, got {got}")
        self._check_placement(first, "x", x)
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"node {first.name}: empty batch (x has shape {list(x.shape)})")
        if first.input_shape is not None and tuple(x.shape[1:]) != first.input_shape:
            raise ValueError(f"node {first.name}: expected x of shape [B, {', '.join(map(str, first.input_shape))}], "
                             f"got {list(x.shape)}")
        if self.check_finite:
            check_finite(x, first.name, self.steps, "input x")

    def _validate_y(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The labels y [B] of the (validated) batch x, as int64: every rule then sees the
        dtype cross-entropy needs (and no uint8 tensor to mistake for a mask)."""
        if not isinstance(y, torch.Tensor) or y.dtype not in LABEL_DTYPES:
            got = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
            raise TypeError(f"labels y must be an integer tensor ({LABEL_DTYPE_NAMES}), got {got}")
        if y.device != x.device:
            raise ValueError(f"labels y are on {y.device}, x on {x.device}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"x and y disagree: x has a batch of {x.shape[0]}, y has shape {list(y.shape)} "
                             f"(expected [{x.shape[0]}])")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got values in [{lo}, {hi}]")
        return y.long()

    # ---- inference ----------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of the whole chain on x [B, ...], validated as in train_step."""
        self._validate_x(x)
        if not self.built:
            self.build(x)
        self._set_backend(x.device)
        for node in self.nodes:
            x = node(x)
        return x

    @torch.no_grad()
    def predict(self, x: torch.Tensor, exit_threshold: float | None = None, ensemble: bool = False) -> Prediction:
        """Class predictions of the chain, with two options that use the per-node heads:

        - ``exit_threshold=t`` (progressive inference): a sample leaves at the first node
          whose head's max softmax exceeds t; the rest go on to the last node;
        - ``ensemble=True``: every sample runs through every node and head, and its
          label is the argmax of the sum of the heads' and the main output's softmax.

        Without heads (rule bp) every sample exits at the last node. x: [B, ...], validated
        as in train_step. Returns a :class:`Prediction` (labels and exit_node int64 [B],
        flops_fraction).
        """
        if exit_threshold is not None and ensemble:
            raise ValueError("predict: give exit_threshold or ensemble=True, not both")
        if exit_threshold is not None and (isinstance(exit_threshold, bool) or not isinstance(exit_threshold, (int, float))
                                           or not 0 <= exit_threshold <= 1):
            raise ValueError(f"predict: exit_threshold must lie in [0, 1] (a softmax probability), "
                             f"got {exit_threshold!r}")
        self._validate_x(x)
        if not self.built:
            self.build(x)
        self._set_backend(x.device)
        # eval mode for the duration: with batch statistics (BatchNorm) a sample's exit
        # would depend on the other samples of the batch, and running statistics would move
        with _eval_mode(self):
            return self._ensemble(x) if ensemble else self._progressive(x, exit_threshold)

    def _progressive(self, x: torch.Tensor, exit_threshold: float | None) -> Prediction:
        flops, last = self.flops(), len(self.nodes) - 1
        labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        exit_node = torch.full_like(labels, last)
        spent = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        pending = torch.arange(x.shape[0], device=x.device)
        h = x
        for k, node in enumerate(self.nodes):
            if not len(pending):  # every sample has exited: no node runs on an empty batch
                break
            h = node(h)
            spent[pending] += flops.nodes[k]
            if k == last:
                labels[pending] = h.argmax(1)
            elif exit_threshold is not None and node.head is not None:
                spent[pending] += flops.heads[k]
                conf, guess = torch.softmax(node.head(h), 1).max(1)
                leave = conf > exit_threshold
                labels[pending[leave]], exit_node[pending[leave]] = guess[leave], k
                pending, h = pending[~leave], h[~leave]
        return Prediction(labels, exit_node, float(spent.mean()) / flops.full)

    def _ensemble(self, x: torch.Tensor) -> Prediction:
        flops = self.flops()
        scores, h = 0, x
        for node in self.nodes:
            h = node(h)
            if node.head is not None:
                scores = scores + torch.softmax(node.head(h), 1)
        scores = scores + torch.softmax(h, 1)
        labels = scores.argmax(1)
        return Prediction(labels, torch.full_like(labels, len(self.nodes) - 1),
                          (flops.full + sum(flops.heads)) / flops.full, scores)

    def flops(self) -> Flops:
        """Forward FLOPs per sample of every node and head, counted once by
        torch.utils.flop_counter on a dry run of two samples (then cached). Fused nodes
        are counted through their plain PyTorch forward, the same arithmetic."""
        if self._flops is None:
            if not self.built:
                raise RuntimeError("flops(): build the network first (build(x) or a first batch)")
            self._flops = self._count_flops()
        return self._flops

    def _count_flops(self) -> Flops:
        from torch.utils.flop_counter import FlopCounterMode

        like = next(self.parameters())
        h = torch.zeros(2, *self.nodes[0].input_shape, dtype=like.dtype, device=like.device)
        nodes, head_flops = [], []
        # eval: batch-statistics layers must not change (nor fail on two samples); grad mode
        # on, so that fused nodes take their autograd forward, which the counter sees
        with _eval_mode(self), torch.enable_grad():
            for node in self.nodes:
                with FlopCounterMode(display=False) as counter:
                    h = node(h)
                nodes.append(counter.get_total_flops() // 2)
                with FlopCounterMode(display=False) as counter:
                    if node.head is not None:
                        node.head(h)
                head_flops.append(counter.get_total_flops() // 2)
        return Flops(nodes, head_flops)

    def submodel(self, k: int) -> nn.Sequential:
        """Nodes 0..k followed by head k, as a standalone ``nn.Sequential`` of deep copies
        (independent of this network, without optimizers or other heads); for k = the
        last node, the whole chain. Input [B, ...] -> logits [B, C]."""
        if not self.built:
            raise RuntimeError("submodel(): build the network first (build(x) or a first batch)")
        last = len(self.nodes) - 1
        if not isinstance(k, int) or not 0 <= k <= last:
            raise ValueError(f"submodel: k must be a node index in [0, {last}], got {k!r}")
        if k < last and self.nodes[k].head is None:
            raise ValueError(f"submodel: node {k} has no head (rule {self.rule.name!r} builds none)")
        parts = [_standalone(node) for node in self.nodes[:k + 1]]
        if k < last:
            parts.append(copy.deepcopy(self.nodes[k].head))
        return nn.Sequential(*parts)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}, num_classes={self.num_classes}, backend={self.backend_request!r}"


@contextlib.contextmanager
def _eval_mode(net: nn.Module):
    """Every module in eval mode inside the block; each module's own mode restored after
    (a user may have put some in eval on purpose)."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _standalone(node: Node) -> Node:
    """A deep copy of ``node`` without its head and optimizer."""
    return copy.deepcopy(node, memo={id(node.head): None, id(node.optimizer): None})
