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
from typing import Callable, Sequence

import torch
from torch import nn

from . import exits, heads, objectives, rules
from .heads import HeadFactory
from .errors import LABEL_DTYPES, check_finite
from .network import DEFAULT_OPTIMIZER, Network, OptimizerFactory
from .nodes import ModuleNode, Node, check_distinct
from .summary import NodeSummary, Summary
from .topology import Goal, Topology

__all__ = ["LocalSequential", "Prediction", "Flops", "DEFAULT_OPTIMIZER", "OptimizerFactory"]


@dataclass
class Prediction:
    """What :meth:`LocalSequential.predict` returns."""
    labels: torch.Tensor     #: int64 [B] predicted class ([B, T] for per-position outputs)
    exit_node: torch.Tensor  #: int64 [B] index of the node whose head answered (the last: the main output)
    #: FLOPs spent per sample, averaged over the batch, as a fraction of one full forward
    #: pass through every node (heads not counted in the denominator; those evaluated on
    #: the way are counted in the numerator, so an ensemble costs more than 1, and so does
    #: a threshold below 1 that no sample happens to pass; at threshold 1, or None in a
    #: per-node sequence, that node's head does not run)
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
            :class:`~localprop.nodes.ModuleNode`). The last node's output is the network's:
            the logits [B, C] (or [B, T, C]) for cross-entropy, what the loss scores otherwise.
        rule: a rule name ("bp", "bp+checkpoint", "greedy", ...) or a :class:`~localprop.rules.Rule`.
        loss: the objective (see :mod:`localprop.objectives`): "cross_entropy" (default; class
            labels [B], or [B, T] per position), "mse" (float targets like the output) or a
            callable ``(output, target) -> loss``. Every node's head predicts the same output.
        num_classes: C, number of classes of the labels; by default the size of the last
            node's output (checked against it when given).
        heads: how the auxiliary heads are built: None (from each node's output shape, see
            :func:`localprop.heads.default_head`), "full" (the same, but a feature map's
            convolution runs at the map's full resolution, not pooled first: better
            features, each head about the FLOPs of one 3-wide convolution of the map, see
            :func:`localprop.heads.map_head`),
            "tokens" (outputs [B, T, D] are token features: pooled over T for per-sample
            targets, per token for per-position ones; the default when x holds token ids)
            or a factory ``(node index, per-sample output shape, output size) -> nn.Module``.
        variable_dims: the per-sample dimensions of x that may change between batches
            (default: every one for integer token ids, none for float inputs); they are
            found to vary in the outputs by a second dry run at build.
        optimizer: factory ``params -> torch.optim.Optimizer``; each node gets its own
            (default SGD lr=0.05, momentum=0.9).
        backend: backend of the fused ops: "reference", "cpp", "triton", "cuda" or "auto"
            (default: $LOCALPROP_BACKEND, else "auto").
        check_finite: raise FloatingPointError on a non-finite input or loss (default True).
        max_grad_norm: clip each update's gradient to this norm, as clip_grad_norm_ does: per
            node (its parameters and its head's) under local rules, over the whole network
            under bp; on fused nodes computed inside the update, without materialising dW
            when the batch is the smaller side (default None: no clipping).
        step_in_backward: in a node's local backward, each parameter steps as soon as its
            gradient is accumulated and frees it, so the node never holds all of its
            gradients at once (a lower peak where they are large beside the activations);
            the same update for the per-parameter optimizers of torch.optim (SGD, Adam,
            AdamW, ...: :data:`localprop.optim.PER_PARAMETER`; others are a ValueError),
            not with ``max_grad_norm``. Global steps (bp, pgl's) and steps that add several
            backward passes (sgr's finite differences) step after their backward as
            before; fused nodes hold no gradient to free (default False).

    Networks whose nodes all have known shapes (LocalLinear) are built at once; others
    are built by :meth:`build` or on the first batch, by a dry run.
    """

    def __init__(self, *nodes: nn.Module, rule: str | rules.Rule = "greedy", num_classes: int | None = None,
                 loss: str | objectives.Objective | Callable | None = None,
                 heads: str | HeadFactory | None = None, optimizer: OptimizerFactory | None = None,
                 backend: str | None = None, check_finite: bool = True,
                 variable_dims: tuple[int, ...] | None = None, max_grad_norm: float | None = None,
                 step_in_backward: bool = False) -> None:
        super().__init__(rule, optimizer, backend, check_finite, max_grad_norm, step_in_backward)
        if not nodes:
            raise ValueError("LocalSequential needs at least one node")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.objective = objectives.resolve(loss)
        self.head_factory = _head_factory(heads)
        if heads not in (None, "tokens") and self.rule.own_heads:  # "tokens" also shapes a critic
            raise ValueError(f"heads={heads!r} would be discarded: rule {self.rule.name!r} replaces the heads by "
                             f"{self.rule.own_heads}")
        self.token_features = heads == "tokens"
        self.variable_dims = None if variable_dims is None else tuple(variable_dims)
        #: the model's keyword inputs (attention masks, ...) of the current batch, which
        #: nodes made by localize() read; names of the ones a batch must give
        self.batch_inputs: dict[str, object] = {}
        self.input_names: tuple[str, ...] = ()
        self.input_defaults: dict[str, object] = {}
        self._example_inputs: dict[str, object] = {}
        check_distinct([(str(k), n) for k, n in enumerate(nodes)])
        self.nodes = nn.ModuleList(n if isinstance(n, Node) else ModuleNode(n) for n in nodes)
        for k, node in enumerate(self.nodes):
            node.name = str(k)
        self.num_classes = num_classes
        self._topology: Topology | None = None
        self._flops: Flops | None = None
        self.input_dtype: torch.dtype | None = None
        #: per-sample shapes of x and of the last node's output, None where a dimension varies
        self.input_spec: tuple[int | None, ...] | None = None
        self.output_spec: tuple[int | None, ...] | None = None
        #: (input, output) per-sample shape of every node, None where a dimension varies
        self.specs: list[tuple[tuple, tuple]] = []
        if all(n.input_shape is not None for n in self.nodes):
            self._check_chain()
            self.specs = [(n.input_shape, n.output_shape) for n in self.nodes]
            self.input_spec, self.output_spec = self.nodes[0].input_shape, self.nodes[-1].output_shape
            self._finish_build()

    # ---- building -----------------------------------------------------------------
    def build(self, example: torch.Tensor, **inputs) -> LocalSequential:
        """Find every node's shapes by a dry run on ``example`` [B, ...] (no gradients,
        eval mode, parameters untouched; a second one with the variable dimensions one
        shorter finds which output dimensions vary), then build heads and optimizers."""
        if self.built:
            return self
        self._check_x_dtype(example)
        self.input_dtype = example.dtype
        self.token_features = self.token_features or not example.is_floating_point()
        if self.variable_dims is None:
            self.variable_dims = tuple(range(example.dim() - 1)) if not example.is_floating_point() else ()
        # two samples are enough to find shapes; keyword inputs with a batch dimension follow
        inputs = {k: v[:2] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == example.shape[0] else v
                  for k, v in inputs.items()}
        self._example_inputs = inputs  # for the FLOP count's dry run
        with _eval_mode(self), torch.no_grad():
            shapes = self._dry_run(example[:2], inputs)
            for node, (u, h) in zip(self.nodes, shapes):
                node.input_shape, node.output_shape = u, h
            shorter = _shorter(example[:2], self.variable_dims)
            other = shapes if shorter is None else self._dry_run(shorter, _shorter_inputs(inputs, shorter))
        # a dimension varies where the two dry runs disagree
        self.specs = [tuple(tuple(a if a == b else None for a, b in zip(s, t)) for s, t in zip(mine, theirs))
                      for mine, theirs in zip(shapes, other)]
        self.input_spec = tuple(None if d in self.variable_dims else s for d, s in enumerate(shapes[0][0]))
        self.output_spec = self.specs[-1][1]
        self._finish_build()
        return self

    def _dry_run(self, x: torch.Tensor, inputs: dict) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(input, output) per-sample shapes of every node on x."""
        shapes, h = [], x
        with self._given(inputs):
            for node in self.nodes:
                u, h = h, node(h)
                shapes.append((tuple(u.shape[1:]), tuple(h.shape[1:])))
        return shapes

    @contextlib.contextmanager
    def _given(self, inputs: dict):
        """The batch's keyword inputs readable by the nodes inside the block."""
        unknown = sorted(set(inputs) - set(self.input_names))
        if unknown:
            takes = ", ".join(self.input_names) or "no keyword inputs"
            raise TypeError(f"unexpected keyword input {unknown[0]!r}: this network takes {takes}")
        missing = [n for n in self.input_names if n not in inputs and n not in self.input_defaults]
        if missing:
            raise TypeError(f"missing keyword input {missing[0]!r}: the model's forward needs it at every batch")
        outer = dict(self.batch_inputs)  # restored after: a dry run may happen inside a step
        self.batch_inputs.clear()
        self.batch_inputs.update(self.input_defaults)
        self.batch_inputs.update(inputs)
        try:
            yield
        finally:
            self.batch_inputs.clear()
            self.batch_inputs.update(outer)

    def _check_chain(self) -> None:
        for prev, node in zip(self.nodes, self.nodes[1:]):
            if prev.output_shape != node.input_shape:
                raise ValueError(f"node {node.name}: expects inputs of shape {list(node.input_shape)}, "
                                 f"but node {prev.name} outputs {list(prev.output_shape)}")

    def _finish_build(self) -> None:
        last, out = self.nodes[-1], self.output_spec
        if self.objective.classes:
            self._check_logits(last, out)
        for k, node in enumerate(self.nodes):
            node.objective = self.objective
            if self.rule.uses_heads and node is not last:
                like = next(node.parameters(), None)  # heads live where the node lives, in its dtype
                head = self.head_factory(k, node.output_shape, out[-1] if out else 1, len(out) > 1,
                                         self.token_features)
                node.head = head if like is None else head.to(device=like.device, dtype=like.dtype)
        self._attach()

    def _check_logits(self, last: Node, out: tuple[int | None, ...]) -> None:
        """The last node's output must be logits (sets num_classes when not given)."""
        self.num_classes = objectives.logits_classes(f"node {last.name}", out, self.num_classes)

    # ---- training -----------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, **inputs) -> rules.StepResult:
        """Train every node once on the batch x [B, ...] (float, or integer token ids into a
        module node) and its targets y: for cross-entropy integer labels in [0, num_classes)
        (int64, or int32/int16/int8/uint8, which train exactly as their int64 values), [B]
        or [B, T] per position; for "mse" float targets shaped like the output.
        ``inputs``: the model's keyword inputs (see localize()). Returns the per-node
        losses (a StepResult)."""
        self._validate_x(x)
        if not self.built:
            self.build(x, **inputs)
        y = self._validate_y(x, y)
        with self._given(inputs):
            return self._step(x, y, x.device)

    def topology(self) -> Topology:
        """The chain as a graph: node k reads node k-1 (node 0 reads "x"); the last node
        is the goal, cross-entropy against "y". Built once: the chain never changes, and
        rules ask for it several times a step."""
        if self._topology is None:
            names = [n.name for n in self.nodes]
            inputs = {name: [prev] for prev, name in zip(["x"] + names, names)}
            self._topology = Topology(list(self.nodes), inputs, {names[-1]: Goal(names[-1], "y", self.objective)})
        return self._topology

    def feeds(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, dict]:
        """The batch as graph rules see it: ({"x": x}, {"y": y})."""
        return {"x": x}, {"y": y}

    def _validate_x(self, x: torch.Tensor) -> None:
        """x must be a non-empty batch [B, *input shape] (float, or integer token ids into a
        module node, whose per-sample dimensions may vary) on the nodes' device and, if
        float, in their dtype and (check_finite on) finite; training and inference alike."""
        first = self.nodes[0]
        self._check_x_dtype(x)
        self._check_placement(first, "x", x)
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"node {first.name}: empty batch (x has shape {list(x.shape)})")
        spec = self.input_spec
        if spec is not None and not objectives.shape_matches(tuple(x.shape[1:]), spec):
            raise ValueError(f"node {first.name}: expected x of shape [B, {objectives.show_shape(spec)}], "
                             f"got {list(x.shape)}")
        if self.input_dtype is not None and x.is_floating_point() != self.input_dtype.is_floating_point:
            raise TypeError(f"node {first.name}: the network was built for x of {self.input_dtype}, got {x.dtype}")
        if self.check_finite and x.is_floating_point():
            check_finite(x, first.name, self.steps, "input x")

    def _check_x_dtype(self, x) -> None:
        first = self.nodes[0]
        tokens = isinstance(x, torch.Tensor) and x.dtype in LABEL_DTYPES and not first.fused
        if not isinstance(x, torch.Tensor) or not (x.is_floating_point() or tokens):
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            also = "" if first.fused else " (or integer token ids)"
            raise TypeError(f"node {first.name}: x must be a floating-point tensor{also}, got {got}")

    def _validate_y(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The targets y of the (validated) batch x, checked by the objective against the
        last node's output and in the dtype its loss needs (class labels as int64: every
        rule then sees what cross-entropy needs, and no uint8 tensor to mistake for a mask)."""
        if isinstance(y, torch.Tensor) and y.device != x.device:
            what = "labels y" if self.objective.classes else "the target y"
            raise ValueError(f"{what} are on {y.device}, x on {x.device}")
        spec = self.output_spec
        if len(spec) == 2 and spec[0] is None and x.dim() >= 2 and 0 in self.variable_dims:
            spec = (x.shape[1], spec[1])  # the positions of the output are those of x
        y = self.objective.check_target("y", y, x.shape[0], spec)
        if self.check_finite and y.is_floating_point():
            check_finite(y, self.nodes[-1].name, self.steps, "target y")
        return y

    # ---- inference ----------------------------------------------------------------
    def forward(self, x: torch.Tensor, **inputs) -> torch.Tensor:
        """The last node's output (the logits [B, C] or [B, T, C] for cross-entropy) of the
        whole chain on x [B, ...], validated as in train_step."""
        self._validate_x(x)
        if not self.built:
            self.build(x, **inputs)
        self._set_backend(x.device)
        with self._given(inputs):
            for node in self.nodes:
                x = node(x)
        return x

    @torch.no_grad()
    def predict(self, x: torch.Tensor, exit_threshold: float | Sequence[float | None] | None = None,
                ensemble: bool = False, **inputs) -> Prediction:
        """Class predictions of the chain, with two options that use the per-node heads:

        - ``exit_threshold=t`` (progressive inference): a sample leaves at the first node
          whose head's max softmax exceeds t; the rest go on to the last node. A sequence
          gives one threshold per node but the last (``len(nodes) - 1`` entries); ``None``
          (or 1) there: that node offers no exit and its head does not run, nor is counted;
        - ``ensemble=True``: every sample runs through every node and head, and its
          label is the argmax of the sum of the heads' and the main output's softmax.

        Without heads (rule bp) every sample exits at the last node. x: [B, ...], validated
        as in train_step. Returns a :class:`Prediction` (labels and exit_node int64 [B],
        flops_fraction). Per-position outputs [B, T, C] give labels [B, T] (exits and
        ensembles are per sample: not for them); objectives other than classes have none.
        """
        if not self.objective.classes:
            raise ValueError(f"predict: loss {self.objective.name!r} has no classes to predict; use net(x)")
        if exit_threshold is not None and ensemble:
            raise ValueError("predict: give exit_threshold or ensemble=True, not both")
        thresholds = None if exit_threshold is None else self._thresholds(exit_threshold)
        self._validate_x(x)
        if not self.built:
            self.build(x, **inputs)
        if exit_threshold is not None or ensemble:
            self._check_per_sample("predict: exits and ensembles", inputs)
        self._set_backend(x.device)
        # eval mode for the duration: with batch statistics (BatchNorm) a sample's exit
        # would depend on the other samples of the batch, and running statistics would move
        with _eval_mode(self), self._given(inputs):
            return self._ensemble(x) if ensemble else self._progressive(x, thresholds)

    def _check_per_sample(self, what: str, inputs: dict) -> None:
        if len(self.output_spec) > 1 or inputs or self.input_names:
            raise ValueError(f"{what} are per sample, for networks of per-sample outputs [B, C] without keyword "
                             "inputs; this one "
                             + ("outputs per position" if len(self.output_spec) > 1 else "takes keyword inputs"))

    @torch.no_grad()
    def choose_exits(self, x: torch.Tensor, y: torch.Tensor, tolerance: float = 0.01, per_node: bool = True,
                     batch_size: int = 1024) -> exits.ExitChoice:
        """Exit thresholds for ``predict(x, exit_threshold=...)`` chosen on held-out data
        (x [N, ...], class labels y int64 [N]; a validation split, not the test set): the
        fewest FLOPs whose accuracy stays within ``tolerance`` (a fraction: 0.01 is one
        point) of the full model's there. One threshold for every node, then, with
        ``per_node``, one per node (None: no exit there, its head not run), by coordinate
        descent; see :mod:`localprop.exits`. The network runs once over x, in eval mode, in
        batches of ``batch_size``. Returns an :class:`~localprop.exits.ExitChoice`."""
        if not self.objective.classes:
            raise ValueError(f"choose_exits: loss {self.objective.name!r} has no classes to predict")
        if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not 0 <= tolerance < 1:
            raise ValueError(f"choose_exits: tolerance is a fraction of accuracy in [0, 1), got {tolerance!r}")
        self._validate_x(x)
        if y.shape != x.shape[:1] or y.dtype not in LABEL_DTYPES:
            raise ValueError(f"choose_exits: y must hold one integer class label per sample of x: expected shape "
                             f"{tuple(x.shape[:1])} and an integer dtype, got {tuple(y.shape)} {y.dtype}")
        if not self.built:
            self.build(x)
        self._check_per_sample("choose_exits: exits", {})
        if all(node.head is None for node in self.nodes[:-1]):
            raise ValueError(f"choose_exits: no node but the last has a head (rule {self.rule.name!r}), "
                             "so there is no exit to choose")
        self._set_backend(x.device)
        with _eval_mode(self):
            scores = exits.scores(self, x, batch_size)
        return exits.choose(scores, y.to(scores.final.device), tolerance, per_node)

    def _thresholds(self, exit_threshold) -> list[float]:
        """One exit threshold per node but the last, each checked to be a probability; a
        node without an exit (None) gets 1, which no softmax probability exceeds."""
        last = len(self.nodes) - 1
        many = isinstance(exit_threshold, (list, tuple))
        if many and len(exit_threshold) != last:
            raise ValueError(f"predict: exit_threshold gives one threshold per node but the last: expected {last} "
                             f"entries, got {len(exit_threshold)}")
        given = list(exit_threshold) if many else [exit_threshold] * last
        for k, t in enumerate(given):
            if t is None and many:
                continue
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
                at = f" (node {k})" if many else ""
                raise ValueError(f"predict: exit_threshold must lie in [0, 1] (a softmax probability){at}, "
                                 f"got {t!r}")
        return [1.0 if t is None else float(t) for t in given]

    def _progressive(self, x: torch.Tensor, thresholds: list[float] | None) -> Prediction:
        last = len(self.nodes) - 1
        # no softmax probability exceeds 1: at threshold 1 no head could let a sample out,
        # so none runs (nor is counted); when no node offers an exit every sample runs
        # through every node: the full cost
        if thresholds is None or min(thresholds, default=1.0) >= 1:
            h = self(x, **{k: v for k, v in self.batch_inputs.items() if k in self.input_names})
            return Prediction(h.argmax(-1), torch.full(h.shape[:1], last, dtype=torch.int64, device=x.device))
        flops = self.flops()
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
            elif thresholds[k] < 1 and node.head is not None:
                spent[pending] += flops.heads[k]
                conf, guess = torch.softmax(node.head(h), 1).max(1)
                leave = conf > thresholds[k]
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
        h = torch.zeros(2, *self.nodes[0].input_shape, dtype=self.input_dtype or like.dtype, device=like.device)
        nodes, head_flops = [], []
        # eval: batch-statistics layers must not change (nor fail on two samples); grad mode
        # on, so that fused nodes take their autograd forward, which the counter sees
        with _eval_mode(self), torch.enable_grad(), self._given(self._example_inputs):
            for node in self.nodes:
                with FlopCounterMode(display=False) as counter:
                    h = node(h)
                nodes.append(counter.get_total_flops() // 2)
                with FlopCounterMode(display=False) as counter:
                    if node.head is not None:
                        node.head(h)
                head_flops.append(counter.get_total_flops() // 2)
        return Flops(nodes, head_flops)

    def describe(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, **inputs) -> Summary:
        """Every node's shapes, parameters and forward FLOPs per sample, with its head's:
        what local learning adds to the model (``print(net.describe())`` for a table). With a
        batch (x, y), also the allocator's peak while each node's modules run in a training
        step (:func:`localprop.memory.node_peaks`), so that one sees which node sets the
        step's peak; measured on a copy of the network (this one, and the RNG, untouched)."""
        from . import memory

        if x is not None and not self.built:
            self.build(x, **inputs)
        flops = self.flops()
        peaks = [None] * len(self.nodes)
        if x is not None:
            rng, trial = torch.get_rng_state(), copy.deepcopy(self)
            try:
                peaks = memory.node_peaks(trial, memory.timeline(trial, x, y, **inputs))
            finally:
                torch.set_rng_state(rng)
        rows = []
        for k, node in enumerate(self.nodes):
            own = sum(p.numel() for name, p in node.named_parameters() if not name.startswith("head."))
            head = 0 if node.head is None else sum(p.numel() for p in node.head.parameters())
            label = getattr(node, "label", None) or type(getattr(node, "block", node)).__name__
            shape_in = self.input_spec if k == 0 else self.specs[k][0]
            rows.append(NodeSummary(node.name, label, tuple(shape_in), tuple(self.specs[k][1]), own, head,
                                    flops.nodes[k], flops.heads[k], peaks[k]))
        return Summary(rows, self.rule.name)

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
        loss = "" if type(self.objective) is objectives.CrossEntropy else f", loss={self.objective!r}"
        return f"rule={self.rule!r}, num_classes={self.num_classes}{loss}, backend={self.backend_request!r}"


@contextlib.contextmanager
def _eval_mode(net: nn.Module):
    """Every module in eval mode inside the block (the user's modules a network was made
    from too); each module's own mode restored after (a user may have put some in eval
    on purpose)."""
    users = [m for user in getattr(net, "_user_modules", ()) for m in user.modules()]
    modes = [(m, m.training) for m in [*net.modules(), *users]]
    net.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _standalone(node: Node) -> Node:
    """A deep copy of ``node`` without its head and optimizer."""
    return copy.deepcopy(node, memo={id(node.head): None, id(node.optimizer): None})


def _head_factory(heads_arg):
    """The head builder for ``heads=``: ``(k, shape, size, per_position, tokens) -> head``."""
    if heads_arg is None or heads_arg == "tokens":
        return lambda k, shape, size, per_position, tokens: heads.default_head(shape, size, per_position, tokens)
    if heads_arg == "full":
        return lambda k, shape, size, per_position, tokens: heads.default_head(shape, size, per_position, tokens,
                                                                               pooled=None)
    if callable(heads_arg) and not isinstance(heads_arg, str):
        return lambda k, shape, size, per_position, tokens: _checked_head(heads_arg(k, shape, size), k)
    raise ValueError(f"heads must be None, 'full', 'tokens' or a factory (node index, output shape, output size) -> "
                     f"nn.Module, got {heads_arg!r}")


def _checked_head(head, k: int) -> nn.Module:
    if not isinstance(head, nn.Module):
        raise TypeError(f"node {k}: the heads factory must return an nn.Module, got {type(head).__name__}")
    return head


def _shorter(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor | None:
    """x with each variable per-sample dimension one shorter (None if none can shrink)."""
    dims = [d for d in dims if x.shape[d + 1] > 1]
    for d in dims:
        x = x.narrow(d + 1, 0, x.shape[d + 1] - 1)
    return x if dims else None


def _shorter_inputs(inputs: dict, x: torch.Tensor) -> dict:
    """Keyword inputs cut to the positions of the shorter x (masks [B, T] and alike)."""
    return {k: v[..., :x.shape[1]] if isinstance(v, torch.Tensor) and v.dim() >= 2 else v
            for k, v in inputs.items()}
