"""LocalGraph: networks as directed acyclic graphs of nodes, with several inputs per node
(concatenated: multi-path) and several goal nodes (multi-goal)."""
from __future__ import annotations

import torch
from torch import nn

from . import rules
from .errors import LABEL_DTYPE_NAMES, LABEL_DTYPES, check_finite
from .network import Network, OptimizerFactory
from .nodes import ModuleNode, Node, check_distinct
from .topology import LOSSES, Goal, Topology, run_forward


class LocalGraph(Network):
    """A network of nodes on a DAG, trained by a rule that supports graphs ("locprop", "bp").

        g = lp.LocalGraph(rule="locprop")
        g.add("a", lp.LocalLinear(64, 128), inputs="x")
        g.add("b", lp.LocalLinear(128, 128), inputs="a")
        g.add("out", lp.LocalLinear(256, 10, activation=None), inputs=["a", "b"])  # skip path
        g.goal("out", target="y")
        g.train_step({"x": x}, {"y": y})
        g({"x": x})["out"]          # logits of the goal node

    Names that are not nodes are the graph's inputs. The graph is checked and built on
    the first call (or by :meth:`build`): cycles, unknown or unused names, shape
    mismatches between connected nodes and goals on missing nodes are errors.

    Args:
        rule, optimizer, backend, check_finite, max_grad_norm, step_in_backward: as in :class:`~localprop.LocalSequential`.
    """

    def __init__(self, rule: str | rules.Rule = "locprop", optimizer: OptimizerFactory | None = None,
                 backend: str | None = None, check_finite: bool = True, max_grad_norm: float | None = None,
                 step_in_backward: bool = False) -> None:
        super().__init__(rule, optimizer, backend, check_finite, max_grad_norm, step_in_backward)
        if not self.rule.graphs:
            raise ValueError(f"rule {self.rule.name!r} trains chains only; use LocalSequential, or a rule "
                             "that supports graphs (locprop, bp)")
        self.graph_nodes = nn.ModuleDict()
        self.node_inputs: dict[str, list[str]] = {}
        self.goals: dict[str, Goal] = {}
        self._topology: Topology | None = None

    # ---- construction --------------------------------------------------------------
    def add(self, name: str, node: nn.Module, inputs: str | list[str] = "x") -> LocalGraph:
        """Add node ``name`` reading ``inputs`` (a name or a list, concatenated in order)."""
        self._check_open()
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"node names must be non-empty strings without '.', got {name!r}")
        if name in self.graph_nodes:
            raise ValueError(f"node {name!r} is defined twice")
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        if not inputs:
            raise ValueError(f"node {name!r}: give at least one input")
        check_distinct([(repr(n), m) for n, m in self.graph_nodes.items()] + [(repr(name), node)])
        node = node if isinstance(node, Node) else ModuleNode(node)
        node.name = name
        self.graph_nodes[name] = node
        self.node_inputs[name] = inputs
        return self

    def goal(self, name: str, target: str, loss: str = "cross_entropy") -> LocalGraph:
        """Make node ``name`` a goal trained against ``targets[target]`` with ``loss``
        ("cross_entropy": int64 labels [B]; "mse": float [B, N] like the node's output; or a
        callable ``(output, target) -> loss``, for rules other than locprop)."""
        self._check_open()
        if not (loss in LOSSES or (callable(loss) and not isinstance(loss, str))):
            raise ValueError(f"goal {name!r}: loss must be one of {', '.join(LOSSES)} or a callable "
                             f"(output, target) -> loss, got {loss!r}")
        self.goals[name] = Goal(name, target, loss)
        return self

    def _check_open(self) -> None:
        if self.built:
            raise RuntimeError("the graph is built (it has trained or run); add nodes and goals before that")

    def build(self) -> LocalGraph:
        """Check the graph, order it, and build optimizers and rule state."""
        if self.built:
            return self
        if not self.graph_nodes:
            raise ValueError("the graph has no nodes")
        if not self.goals:
            raise ValueError("the graph has no goal: call goal(name, target=...)")
        for name in self.goals:
            if name not in self.graph_nodes:
                raise ValueError(f"goal on missing node {name!r}; nodes are {', '.join(self.graph_nodes)}")
        topo = Topology(self._order(), self.node_inputs, self.goals)
        self._check_unused(topo)
        self._check_shapes(topo)
        self._topology = topo
        self._attach()
        return self

    def _order(self) -> list[Node]:
        """Topological order (depth-first); a cycle is an error that names it."""
        order, state = [], {}

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == "done" or name not in self.graph_nodes:
                return
            if state.get(name) == "open":
                cycle = path[path.index(name):] + [name]
                raise ValueError(f"the graph has a cycle: {' -> '.join(cycle)}")
            state[name] = "open"
            for i in self.node_inputs[name]:
                visit(i, path + [name])
            state[name] = "done"
            order.append(self.graph_nodes[name])

        for name in self.graph_nodes:
            visit(name, [])
        return order

    def _check_unused(self, topo: Topology) -> None:
        for node in topo.order:
            if node.name not in topo.consumers and node.name not in self.goals:
                raise ValueError(f"node {node.name!r} is unused: no node reads it and it is no goal")

    def _check_shapes(self, topo: Topology) -> None:
        """Connected nodes of known shapes must agree: Σ input widths == in_features."""
        for node in topo.order:
            ins = topo.inputs[node.name]
            if node.input_shape is None or any(i not in self.graph_nodes for i in ins):
                continue  # a graph input's width is checked on the first batch
            widths = [self.graph_nodes[i].output_shape for i in ins]
            if any(w is None for w in widths):
                continue
            total = sum(w[0] for w in widths)
            if (total,) != node.input_shape:
                raise ValueError(f"node {node.name!r}: its inputs {ins} give {total} features, "
                                 f"it expects {node.input_shape[0]}")

    # ---- running --------------------------------------------------------------------
    def topology(self) -> Topology:
        """Nodes in topological order, their inputs and the goals (builds the graph)."""
        if self._topology is None:
            self.build()
        return self._topology

    def feeds(self, inputs, targets):
        """The rule's view of a batch: (inputs dict, targets dict)."""
        return inputs, targets

    def train_step(self, inputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> rules.StepResult:
        """Train every node once. inputs: name -> float [B, K]; targets: name -> integer
        labels [B] (cross-entropy goals: int64, or int32/int16/int8/uint8, which train
        exactly as their int64 values) or float [B, N] (mse goals)."""
        topo = self.topology()
        targets = self._validate(topo, inputs, targets)
        return self._step(inputs, targets, next(iter(inputs.values())).device)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs of the goal nodes: goal name -> [B, N]."""
        topo = self.topology()
        self._validate_inputs(topo, inputs)
        self._set_backend(next(iter(inputs.values())).device)
        values = run_forward(topo, inputs, lambda node, u: node(u))
        return {name: values[name] for name in self.goals}

    def _validate_inputs(self, topo: Topology, inputs) -> None:
        if not isinstance(inputs, dict):
            raise TypeError(f"inputs must be a dict name -> tensor, got {type(inputs).__name__}")
        for name in topo.sources:
            if name not in inputs:
                readers = topo.consumers[name]
                raise ValueError(f"unknown input {name!r} (read by node {readers[0]!r}): it is no node and "
                                 f"not given; inputs given: {sorted(inputs)}")
        for name in inputs:
            if name not in topo.consumers:
                raise ValueError(f"unused input {name!r}: no node reads it")
        sizes = {name: t.shape[0] if isinstance(t, torch.Tensor) and t.dim() else None for name, t in inputs.items()}
        for name, t in inputs.items():
            reader = topo.consumers[name][0]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"node {reader!r}: input {name!r} must be a floating-point tensor, got {got}")
            self._check_placement(self.graph_nodes[reader], f"input {name!r}", t)
            if t.dim() != 2 or t.shape[0] == 0:
                raise ValueError(f"node {reader!r}: input {name!r} must be a non-empty [B, K] batch, "
                                 f"got {list(t.shape)}")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"inputs disagree on the batch size: {sizes}")
        values = {name: t[:1] for name, t in inputs.items()}  # widths only: run nothing
        for node in topo.order:
            widths = [values[i].shape[1] for i in topo.inputs[node.name]]
            if node.input_shape is not None and (sum(widths),) != node.input_shape:
                raise ValueError(f"node {node.name!r}: its inputs {topo.inputs[node.name]} give {sum(widths)} "
                                 f"features, it expects {node.input_shape[0]}")
            if node.output_shape is None:
                break  # module nodes of unknown shape: their own layers will check
            values[node.name] = values[topo.inputs[node.name][0]].new_empty(1, node.output_shape[0])
        if self.check_finite:
            for name, t in inputs.items():
                check_finite(t, topo.consumers[name][0], self.steps, f"input {name!r}")

    def _validate(self, topo: Topology, inputs, targets) -> dict[str, torch.Tensor]:
        """Check a batch; returns the targets with cross-entropy labels as int64 (the dtype
        every rule's cross-entropy needs)."""
        self._validate_inputs(topo, inputs)
        if not isinstance(targets, dict):
            raise TypeError(f"targets must be a dict name -> tensor, got {type(targets).__name__}")
        batch = next(iter(inputs.values())).shape[0]
        targets = dict(targets)
        for goal in self.goals.values():
            if goal.target not in targets:
                raise ValueError(f"goal {goal.node!r}: target {goal.target!r} is missing; targets given: "
                                 f"{sorted(targets)}")
            t, node = targets[goal.target], self.graph_nodes[goal.node]
            width = node.output_shape[0] if node.output_shape else None
            if goal.loss == "cross_entropy":
                if not isinstance(t, torch.Tensor) or t.dtype not in LABEL_DTYPES:
                    got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                    raise TypeError(f"goal {goal.node!r}: cross-entropy target {goal.target!r} must be integer "
                                    f"labels ({LABEL_DTYPE_NAMES}), got {got}")
                if t.shape != (batch,):
                    raise ValueError(f"goal {goal.node!r}: target {goal.target!r} must have shape [{batch}], "
                                     f"got {list(t.shape)}")
                lo, hi = int(t.min()), int(t.max())
                if width is not None and (lo < 0 or hi >= width):
                    raise ValueError(f"goal {goal.node!r}: labels must lie in [0, {width}), got [{lo}, {hi}]")
                targets[goal.target] = t.long()
            elif goal.loss != "mse":  # a loss of one's own: only the batch can be checked
                goal.objective.check_target(repr(goal.target), t, batch, ())
            elif width is not None and t.shape != (batch, width):
                raise ValueError(f"goal {goal.node!r}: mse target {goal.target!r} must have shape "
                                 f"[{batch}, {width}], got {list(t.shape)}")
        return targets

    def extra_repr(self) -> str:
        edges = ", ".join(f"{n}<-{'+'.join(i)}" for n, i in self.node_inputs.items())
        return f"rule={self.rule!r}, edges=[{edges}], goals={list(self.goals)}"
