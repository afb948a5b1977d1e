"""Any ``nn.Module`` as a chain of nodes: its ``forward`` traced by torch.fx, the graph cut
at the start of named submodules (the split points), each piece a standalone node.

Why a traced split (and not hooks on the model's own forward): the pieces are real
modules, each with one input activation and one output, so every rule, progressive
inference, sub-models and the pipeline across processes take them as they take any
block; each piece keeps the functional ops of ``forward`` that run between its split
points (``F.relu``, ``torch.flatten``, residual adds). The blocks themselves are traced
as whole calls (leaves), so what happens inside a block, control flow included, needs no
tracing; only the code of ``forward`` around them does.

Between two nodes exactly one activation (a value that depends on parameters) may
cross; values that do not (token positions, masks, sizes, the model's keyword inputs)
travel beside it, read by the nodes that need them from the network's ``batch_inputs``.
"""
from __future__ import annotations

import difflib
import inspect
import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import fx, nn

from . import recompute
from .lean import BatchNorm
from .nodes import ModuleNode

#: fx ops whose result carries no gradient, whatever their argument (sizes, dtypes, devices)
_NO_GRAD_METHODS = {"size", "dim", "numel", "type", "get_device"}
_NO_GRAD_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}


class TracedNode(ModuleNode):
    """A piece of a traced model: ``block`` is a GraphModule over the model's own
    submodules (trained in place). It takes the activation u, reads the side values it
    needs (``reads``) from ``values`` and writes those it computes for later nodes
    (``writes``)."""

    def __init__(self, block: fx.GraphModule, reads: Sequence[str], writes: Sequence[str], label: str) -> None:
        super().__init__(block)
        self.reads, self.writes, self.label = tuple(reads), tuple(writes), label
        self.values: dict[str, object] = {}

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        missing = [r for r in self.reads if r not in self.values]
        if missing:
            raise RuntimeError(f"node {self.name} ({self.label}): the value {missing[0]!r} it reads was not given "
                               f"(a keyword input of the model, or computed by an earlier node)")
        out = self.block(u, *[self.values[r] for r in self.reads])
        if not self.writes:
            return out
        self.values.update(zip(self.writes, out[1:]))
        return out[0]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, {self.label}"


@dataclass
class Split:
    """The nodes of a traced model and what its forward takes besides x."""
    nodes: list[TracedNode]
    input_names: tuple[str, ...]        #: keyword inputs the nodes read
    defaults: dict[str, object]         #: their defaults in the model's forward signature


class _Tracer(fx.Tracer):
    """torch.fx's tracer with the given modules (by qualified name) called whole, and the
    lean BatchNorms (localize(lean=True)'s) as torch.nn's own layers are."""

    def __init__(self, leaves: Iterable[str]) -> None:
        super().__init__()
        self.leaves = set(leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or isinstance(m, BatchNorm) or super().is_leaf_module(m, qualname)


def find_blocks(model: nn.Module, block: type | tuple[type, ...] | None) -> list[str]:
    """Qualified names of the candidate blocks a node may start at, outermost ones only:
    the instances of ``block``; by default the children with parameters of the outermost
    ``nn.Sequential`` / ``nn.ModuleList`` containers (ResNet stages' blocks, a transformer's
    layers; containers inside those, such as a block's shortcut, are the blocks' own),
    when there are at least two; failing those, the model's children with parameters."""
    if block is not None:
        names = [n for n, m in model.named_modules() if n and isinstance(m, block)]
        if not names:
            kinds = block.__name__ if isinstance(block, type) else ", ".join(b.__name__ for b in block)
            raise ValueError(f"localize: {type(model).__name__} has no module of class {kinds} (block=)")
        return _outermost(names)
    containers = _outermost([n for n, m in model.named_modules()
                             if n and isinstance(m, (nn.Sequential, nn.ModuleList))])
    modules = dict(model.named_modules())
    names = [f"{c}.{k}" for c in containers for k, child in modules[c].named_children() if _has_params(child)]
    return names if len(names) >= 2 else [n for n, c in model.named_children() if _has_params(c)]


def split(model: nn.Module, starts: Sequence[str], leaves: Iterable[str], inputs: Sequence[str] = (),
          checkpoint: bool = False) -> Split:
    """Cut ``model``'s traced forward into len(starts) + 1 nodes, a new node beginning at
    the call of each module named in ``starts``; ``leaves``: modules traced as whole
    calls (the split points are too); ``inputs``: forward parameters with a default that
    are still given per batch (others with a default are fixed at it for the trace).
    ``checkpoint``: every call of a leaf is checkpointed (its activations recomputed in
    the node's backward, one block at a time), and so is each run of the code between
    them that uses parameters (see :func:`_checkpoint_between`)."""
    names = dict(model.named_modules())
    for s in starts:
        _check_name(model, names, s, "split point")
    gm = trace(model, set(leaves) | set(starts), inputs)
    order = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    for s in starts:
        if order.count(s) != 1:
            how = "never called" if s not in order else f"called {order.count(s)} times"
            raise ValueError(f"localize: split point {s!r} is {how} in {type(model).__name__}.forward; a split "
                             f"point must be a module its forward calls once")
    starts = sorted(starts, key=order.index)
    part = _assign(gm.graph, starts)
    carries = _carries(gm)
    count = len(starts) + 1
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    crossing = _crossing(gm.graph, part, carries, count, first)
    labels = ["from the model's input"] + [f"from {s!r}" for s in starts]
    recompute = set(leaves) | set(starts) if checkpoint else set()
    nodes = [_node(gm, part, k, count, crossing, labels[k], recompute) for k in range(count)]
    kw = tuple(n.target for n in gm.graph.nodes if n.op == "placeholder" and n is not first)
    params = inspect.signature(model.forward).parameters
    defaults = {n: params[n].default for n in kw if n in params and params[n].default is not inspect.Parameter.empty}
    return Split(nodes, kw, defaults)


def trace(model: nn.Module, leaves: set[str], inputs: Sequence[str] = ()) -> fx.GraphModule:
    """``model``'s forward as a GraphModule, ``leaves`` called whole; TypeError naming the
    model and what to pass instead when torch.fx cannot trace it."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    unknown = sorted(set(inputs) - {p.name for p in params})
    if unknown:
        raise ValueError(f"localize: {type(model).__name__}.forward has no parameter {unknown[0]!r} (inputs=)")
    concrete = {p.name: p.default for p in params
                if p.default is not inspect.Parameter.empty and p.name not in inputs
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    way_out = ("Make the module that holds this code a block called whole (block=TheBlockClass, or a split "
               "point), give localize() an nn.Sequential / a list of blocks, or train the model through its own "
               "forward with localize(..., hooks=True) (rules greedy, bp, pgl)")
    try:
        graph = traced_in_both_modes(model, lambda: _Tracer(leaves).trace(model, concrete_args=concrete or None))
    except ModeDependent as e:
        raise TypeError(f"localize: {type(model).__name__}.forward runs other code in training than in eval "
                        f"mode ({e}), and a traced graph holds one of them. {way_out}") from None
    except Exception as e:  # torch.fx raises many kinds: TraceError, TypeError, RuntimeError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TypeError(f"localize: torch.fx cannot trace {type(model).__name__}.forward: {first}. {way_out}") from e
    return fx.GraphModule(model, graph)


# ---- the training flag ------------------------------------------------------------------
class ModeDependent(Exception):
    """The code traced in training mode and in eval mode differs beyond flag arguments."""


def traced_in_both_modes(root: nn.Module, trace_fn) -> fx.Graph:
    """``trace_fn()``'s graph of ``root``'s code, valid in both modes. torch.fx evaluates
    ``self.training`` while tracing, so a graph traced in one mode would run that mode's
    code in both (``F.dropout(x, training=self.training)`` would drop out at inference).
    The code is traced with every module of ``root`` in training mode and in eval mode (their
    own modes restored after); where the two graphs differ only in bool arguments, those
    read the flag of the module the graph runs as (a get_attr of ``training``, negated
    where the training trace had False): a node's, which ``net.train()`` / ``net.eval()``
    set, so code traced through a submodule follows the node's mode, not one the user
    gave that submodule alone. ModeDependent where they differ otherwise (control flow)."""
    modes = [(m, m.training) for m in root.modules()]
    try:  # the flags set directly: a model's own train() may do more than set them
        for m, _ in modes:
            m.training = True
        train = trace_fn()
        for m, _ in modes:
            m.training = False
        evaluation = trace_fn()
    finally:
        for m, mode in modes:
            m.training = mode
    _merge_modes(train, evaluation)
    return train


def _merge_modes(train: fx.Graph, evaluation: fx.Graph) -> None:
    """Make ``train`` read the flag where ``evaluation`` differs from it in a bool argument
    (in place); ModeDependent naming the first op that differs otherwise."""
    ops, others = list(train.nodes), list(evaluation.nodes)
    pairs = dict(zip(others, ops))
    read: list[fx.Node] = []  # the get_attr of the flag, made on first use

    def flag(value_in_training: bool, where: fx.Node) -> fx.Node:
        if not read:
            with train.inserting_before(next(n for n in ops if n.op != "placeholder")):
                read.append(train.get_attr("training"))
        if value_in_training:
            return read[0]
        with train.inserting_before(where):  # beside its user: in the same node of a split
            return train.call_function(operator.not_, (read[0],))

    def merged(a, b, where: fx.Node):
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and pairs.get(b) is a):
                raise ModeDependent(f"the arguments of {_op(where)}")
            return a
        if isinstance(a, bool) and isinstance(b, bool) and a != b:
            return flag(a, where)
        if isinstance(a, (tuple, list)) and type(a) is type(b) and len(a) == len(b):
            return type(a)(merged(x, y, where) for x, y in zip(a, b))
        if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
            return {k: merged(a[k], b[k], where) for k in a}
        if a is b:
            return a
        same = torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) \
            else type(a) is type(b) and a == b
        if not same:
            raise ModeDependent(f"the arguments of {_op(where)}")
        return a

    for a, b in zip(ops, others):
        if (a.op, a.target) != (b.op, b.target):
            raise ModeDependent(f"{_op(a)} in training mode where eval mode has {_op(b)}")
        a.args, a.kwargs = merged(a.args, b.args, a), merged(a.kwargs, b.kwargs, a)
    if len(ops) != len(others):
        raise ModeDependent(f"{len(ops)} ops in training mode against {len(others)} in eval mode")


# ---- the partition of the graph ----------------------------------------------------------
def _assign(graph: fx.Graph, starts: list[str]) -> dict[fx.Node, int]:
    """The node index of every op (placeholders and parameter reads: -1, placed by their users)."""
    part, k = {}, 0
    for n in graph.nodes:
        if n.op == "call_module" and n.target in starts:
            k = starts.index(n.target) + 1
        part[n] = -1 if n.op in ("placeholder", "get_attr") else k
    return part


def _carries(gm: fx.GraphModule) -> dict[fx.Node, bool]:
    """Which values depend on parameters (and so carry gradient to them)."""
    carries = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            carries[n] = False
        elif n.op == "get_attr":
            carries[n] = isinstance(_attr(gm, n.target), nn.Parameter)
        elif (n.op == "call_method" and n.target in _NO_GRAD_METHODS) or \
                (n.op == "call_function" and n.target is getattr and n.args[1] in _NO_GRAD_ATTRS):
            carries[n] = False
        else:
            own = n.op == "call_module" and _has_params(gm.get_submodule(n.target))
            carries[n] = own or any(carries[a] for a in n.all_input_nodes)
    return carries


@dataclass
class _Crossing:
    activation: dict[int, fx.Node]        #: node k -> the activation it takes (k >= 1)
    reads: dict[int, list[fx.Node]]       #: node k -> side values it reads
    writes: dict[int, list[fx.Node]]      #: node k -> side values it computes for later nodes


def _crossing(graph: fx.Graph, part, carries, count: int, first: fx.Node) -> _Crossing:
    """What crosses each boundary; ValueError for a skip connection across one, or for
    two (or no) activations between consecutive nodes. ``first``: the input x."""
    activation, reads, writes = {}, defaultdict(list), defaultdict(list)
    for n in graph.nodes:
        if n.op in ("get_attr", "output"):
            continue
        home = part[n]
        users = sorted({count - 1 if u.op == "output" else part[u] for u in n.users} - {home})
        if n is first:  # node 0's input; a later node that reads x too gets it from node 0
            users = [u for u in users if u > 0]
            writes[0] += [n] if users else []
        elif n.op == "placeholder":  # a keyword input, given to the network per batch
            pass
        elif carries[n]:
            _check_activation(n, home, users, part, activation)
            if users:
                activation[users[0]] = n
            continue
        elif users:
            writes[home].append(n)
        for u in users:
            reads[u].append(n)
    for k in range(1, count):
        if k not in activation:
            raise ValueError(f"localize: node {k} takes no activation from node {k - 1} (nothing computed from "
                             f"parameters crosses that split); choose split points inside the chain of blocks")
    return _Crossing(activation, dict(reads), dict(writes))


def _check_activation(n: fx.Node, home: int, users: list[int], part, activation: dict) -> None:
    """An activation may only be used by its own node and the next one."""
    if not users:
        return
    if users != [home + 1]:
        far = next(u for u in n.users if u.op != "output" and part[u] > home + 1) \
            if any(u.op != "output" and part[u] > home + 1 for u in n.users) else next(iter(n.users))
        where = "the model's output" if far.op == "output" else f"{_op(far)} in node {part[far]}"
        raise ValueError(f"localize: a skip connection crosses a split: {_op(n)} of node {home} is used by "
                         f"{where}; only one activation passes from a node to the next, so move the split "
                         f"points (split_points=) to where nothing skips over them")
    if users[0] in activation:
        raise ValueError(f"localize: two activations pass from node {home} to node {users[0]}: "
                         f"{_op(activation[users[0]])} and {_op(n)} (a skip connection over the split?); only one "
                         f"passes from a node to the next, so split where one tensor crosses (between blocks)")


def _node(gm: fx.GraphModule, part, k: int, count: int, crossing: _Crossing, label: str,
          recompute: set[str]) -> TracedNode:
    """Node k as a standalone GraphModule: (u, *reads) -> h or (h, *writes); the calls of
    the modules in ``recompute`` checkpointed, unless that makes one segment: recomputing
    a node's whole forward at once holds the same activations in its backward as keeping
    them, and its output twice (the kept one and the recomputed one), so such a node
    recomputes its block's first half instead (:func:`_checkpoint_first_half`)."""
    graph, env = fx.Graph(), {}
    source = next(n for n in gm.graph.nodes if n.op == "placeholder") if k == 0 else crossing.activation[k]
    env[source] = graph.placeholder("u")
    reads = crossing.reads.get(k, [])
    for n in reads:
        env[n] = graph.placeholder(_value_name(n))

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:  # a parameter or buffer read: every node that uses one reads it itself
            env[a] = graph.node_copy(a)
        return env[a]

    for n in gm.graph.nodes:
        if part.get(n) == k and n.op == "call_module" and n.target in recompute:
            module = graph.get_attr(n.target)
            env[n] = graph.call_function(checkpointed, (module, *fx.map_arg(n.args, arg)), fx.map_arg(n.kwargs, arg))
        elif part.get(n) == k and n.op not in ("output", "placeholder", "get_attr"):
            env[n] = graph.node_copy(n, arg)
    if k == count - 1:
        out = fx.map_arg(next(n for n in gm.graph.nodes if n.op == "output").args[0], arg)
        if not isinstance(out, fx.Node):
            raise ValueError(f"localize: the model's forward returns {type(out).__name__}; localize needs one "
                             f"output tensor (wrap the model in a module that returns the tensor to learn from)")
    else:
        out = env[crossing.activation[k + 1]]
    writes = crossing.writes.get(k, [])
    graph.output((out, *[env[n] for n in writes]) if writes else out)
    block = fx.GraphModule(gm, graph)
    if recompute:
        _checkpoint_between(block)
        if sum(n.op == "call_function" and n.target is checkpointed for n in block.graph.nodes) < 2:
            plain = _node(gm, part, k, count, crossing, label, set())
            return TracedNode(_checkpoint_first_half(plain.block), plain.reads, plain.writes, label)
    return TracedNode(block, [_value_name(n) for n in reads], [_value_name(n) for n in writes], label)


def _checkpoint_first_half(block: fx.GraphModule) -> fx.GraphModule:
    """A node of one block, checkpointed inside the block: its forward traced down to
    torch.nn's layers, the ops before its middle layer with parameters recomputed in the
    backward as one run, the rest kept.
    On a ResNet's BasicBlock the first convolution, BatchNorm and ReLU are recomputed: their
    activations are not held through the second half's backward. ``block`` itself when its
    code cannot be traced (control flow, or other ops by mode) or it has fewer than two
    such layers."""
    try:
        flat = fx.GraphModule(block, traced_in_both_modes(block, lambda: _Tracer(()).trace(block)))
    except Exception:  # torch.fx raises many kinds (and ModeDependent); the block then runs as it is
        return block
    ops = [n for n in flat.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    layers = [i for i, n in enumerate(ops) if n.op == "call_module" and _has_params(flat.get_submodule(n.target))]
    if len(layers) < 2:
        return block
    _checkpoint_run(flat, ops[:layers[len(layers) // 2]], "_first_half")
    flat.graph.lint()
    flat.recompile()
    return flat


def _checkpoint_between(gm: fx.GraphModule) -> None:
    """Checkpoint the code of a node between its checkpointed blocks too (a ResNet's stem,
    a classifier after the pooling): each run of ops between two block calls that uses a
    module with parameters becomes one checkpointed call, so that none of the node's
    activations outlives the forward but the blocks' inputs. In place."""
    runs, run = [], []
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            continue  # a parameter read: copied into the run that uses it
        if n.op in ("placeholder", "output") or (n.op == "call_function" and n.target is checkpointed):
            runs.append(run)
            run = []
        else:
            run.append(n)
    for i, run in enumerate(r for r in runs if any(n.op == "call_module" and _has_params(gm.get_submodule(n.target))
                                                   for n in r)):
        _checkpoint_run(gm, run, f"_between{i}")
    gm.graph.lint()
    gm.recompile()


def _checkpoint_run(gm: fx.GraphModule, run: list[fx.Node], name: str) -> None:
    """Replace the consecutive ops ``run`` of ``gm`` by one checkpointed call of a
    GraphModule of them (registered as ``name``, through :class:`_Run`)."""
    inside = set(run)
    inputs = list(dict.fromkeys(a for n in run for a in n.all_input_nodes if a not in inside and a.op != "get_attr"))
    outputs = [n for n in run if any(u not in inside for u in n.users)]
    sub, env = fx.Graph(), {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:  # a parameter or buffer read
            env[a] = sub.node_copy(a)
        return env[a]

    for n in run:
        env[n] = sub.node_copy(n, arg)
    sub.output(tuple(env[o] for o in outputs))
    gm.add_submodule(name, _Run(fx.GraphModule(gm, sub)))
    with gm.graph.inserting_before(run[0]):
        call = gm.graph.call_function(checkpointed, (gm.graph.get_attr(name), *inputs))
        results = [gm.graph.call_function(operator.getitem, (call, j)) for j in range(len(outputs))]
    for old, new in zip(outputs, results):
        old.replace_all_uses_with(new)
    for n in reversed(run):
        gm.graph.erase_node(n)
    for n in list(gm.graph.nodes):  # parameter reads only the run used
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)


class _Run(nn.Module):
    """Ops of a node between its blocks, as one module to checkpoint. Its GraphModule is
    held unregistered: the modules it calls are the node's own, which state_dict() must
    not list twice (deep copies keep them shared)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        object.__setattr__(self, "graph_module", gm)

    def forward(self, *args):
        self.graph_module.training = self.training  # its code may read the flag; train()/eval() skip it
        return self.graph_module(*args)


def checkpointed(module: nn.Module, *args, **kwargs):
    """``module(*args, **kwargs)``, its activations recomputed in the backward when
    autograd records, its buffers updated once (:func:`localprop.recompute.recomputed`)."""
    runs = module.graph_module if isinstance(module, _Run) else module
    return recompute.recomputed(module, *args, modules=runs.modules(), **kwargs)


# ---- small helpers ----------------------------------------------------------------------
def _value_name(n: fx.Node) -> str:
    return n.target if n.op == "placeholder" else f"_{n.name}"


def _op(n: fx.Node) -> str:
    what = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return f"{n.name!r} ({n.op} {what})"


def _attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _outermost(names: list[str]) -> list[str]:
    """``names`` without those inside another of them."""
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _check_name(model: nn.Module, names: dict, name: str, what: str) -> None:
    if not isinstance(name, str) or name not in names or not name:
        close = difflib.get_close_matches(str(name), [n for n in names if n], n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"localize: {type(model).__name__} has no submodule {name!r} ({what}){hint}")
