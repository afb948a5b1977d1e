"""localize(): turn an existing model into a network of local-learning nodes."""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import statistics
import time
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from . import memory, rules, trace
from .engine import LocalSequential, OptimizerFactory
from .hooked import HookedNetwork
from .lean import lean_layers, make_lean
from .recompute import held_buffers, put_buffers


#: parameter-free layers that shrink a map: with balance="memory" they may start a node (see units)
POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
         nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
         nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def units(children: Sequence[nn.Module], pool_first: bool = False) -> list[list[nn.Module]]:
    """Split ``children`` into units: each starts at a child with parameters and takes the
    parameter-free children after it (activations, pooling, flatten); parameter-free
    children before the first such child join the first unit.

    ``pool_first``: a pooling layer (:data:`POOLS`) instead starts the unit of the next child
    with parameters. At the start of a node it runs on the node's detached input, outside
    autograd, so it keeps nothing for a backward; at the end of one it keeps its input's
    gradient (a full-resolution map) and MaxPool its indices. A last unit left without
    parameters joins the one before."""
    groups: list[list[nn.Module]] = []
    for child in children:
        starts = any(True for _ in child.parameters()) or (pool_first and isinstance(child, POOLS))
        # a unit that has no parameters yet (a pool that began it) takes what follows
        open_unit = bool(groups) and not any(True for m in groups[-1] for _ in m.parameters())
        if starts and groups and not open_unit:
            groups.append([child])
        elif groups:
            groups[-1].append(child)
        else:
            groups.append([child])
    if len(groups) > 1 and not any(True for m in groups[-1] for _ in m.parameters()):
        last = groups.pop()
        groups[-1] += last
    return groups


BALANCES = ("count", "params", "memory", "time")


def group_counts(blocks: int, nodes: int, costs: Sequence[float] | None = None,
                 group_cost: Callable[[int, int], float] | None = None) -> list[int]:
    """How many of ``blocks`` consecutive blocks each of ``nodes`` groups takes. Without
    ``costs``, counts that differ by at most one (earlier groups take the extra); with a
    cost per block, the contiguous split whose largest summed cost (or ``group_cost(j,
    k)`` of blocks j..k-1) is smallest."""
    if costs is None:
        size, extra = divmod(blocks, nodes)
        return [size + (k < extra) for k in range(nodes)]
    from .distributed.partition import partition  # the same contiguous min-max split as the pipeline's

    return partition(list(costs), nodes, group_cost)


def split_balanced(parts: Sequence[list[nn.Module]], nodes: int, costs: Sequence[float] | None = None,
                   checkpoint: bool = False) -> list[nn.Module]:
    """Join consecutive ``parts`` into ``nodes`` groups (see :func:`group_counts` and :func:`join`)."""
    _check_nodes(nodes, len(parts))
    return join(parts, group_counts(len(parts), nodes, costs), checkpoint)


def join(parts: Sequence[list[nn.Module]], counts: Sequence[int], checkpoint: bool = False) -> list[nn.Module]:
    """One module per group of ``counts`` consecutive parts. A group of one module is that
    module itself; with ``checkpoint``, a group of several parts is a :class:`Segments`
    that recomputes each part in its backward."""
    groups, start = [], 0
    for count in counts:
        mine = parts[start:start + count]
        modules = [m for part in mine for m in part]
        if checkpoint and len(mine) > 1:
            groups.append(Segments(modules, [len(part) for part in mine]))
        else:
            groups.append(modules[0] if len(modules) == 1 else nn.Sequential(*modules))
        start += count
    return groups


def _check_nodes(nodes: int, parts: int) -> None:
    if not 1 <= nodes <= parts:
        raise ValueError(f"nodes must lie in [1, {parts}] for a model of {parts} blocks with "
                         f"parameters, got {nodes}")


class Segments(nn.Sequential):
    """An nn.Sequential (the same children, the same state_dict keys) run in segments of
    ``sizes`` modules, each checkpointed: its activations are recomputed in the backward,
    one segment at a time, so a node holds one segment's working set."""

    def __init__(self, modules: Sequence[nn.Module], sizes: Sequence[int]) -> None:
        super().__init__(*modules)
        self.sizes = list(sizes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        modules, start = list(self), 0
        for size in self.sizes:
            h = trace.checkpointed(nn.Sequential(*modules[start:start + size]), h)
            start += size
        return h


def part_costs(parts: Sequence[list[nn.Module]], balance: str, example: torch.Tensor | None,
               step_in_backward: bool = False) -> list[float] | None:
    """A cost per part for ``balance``: None for "count"; its parameter count for
    "params"; measured on a dry run through the parts on ``example`` [B, ...] for "memory"
    (the allocator peak of the part's forward and backward in training mode: the
    activations it keeps for its backward are what a node of several parts holds
    together, so they add up; with ``step_in_backward`` each parameter's gradient is freed
    as it is accumulated, as a step in the backward frees it) and "time" (the median of 3
    timed forward and backward passes after a warm-up: a timing, so two runs can split
    differently). The model is left as it was: gradients, buffers (BatchNorm's running
    statistics) and the random state are restored (see :func:`_dry_run`). Heads and the
    loss are not measured (they are built later, from the nodes' outputs): a node's step
    also holds its head's working set, small for the default head of a map (pooled
    first), more for a token head, and the last node's loss on its logits (an LM's
    [B, T, V])."""
    if balance == "count":
        return None
    if balance == "params":
        return [float(sum(p.numel() for m in part for p in m.parameters())) for part in parts]
    if example is None:
        raise ValueError(f"localize(balance={balance!r}) measures each block on a dry run: give example_input")
    return [_measure(block, u, balance, step_in_backward) for block, u in _dry_inputs(parts, example)]


def _dry_inputs(parts: Sequence[list[nn.Module]], example: torch.Tensor) -> Iterator[tuple[nn.Module, torch.Tensor]]:
    """Each part as one module with its input, on a dry run through the parts on
    ``example`` (no autograd; see :func:`_dry_run`)."""
    h = example
    for part in parts:
        block = nn.Sequential(*part)
        yield block, h
        with torch.no_grad(), _dry_run(block, h.device):
            h = block(h)


@contextlib.contextmanager
def _dry_run(block: nn.Module, device: torch.device) -> Iterator[None]:
    """Run ``block`` in training mode (the memory and time of a step) and then put back
    what that changes: its parameters' gradients, its buffers and the random state (dropout)."""
    grads = {p: p.grad for p in block.parameters()}
    modules = list(block.modules())
    buffers = held_buffers(modules)
    modes = [(m, m.training) for m in modules]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            block.train()
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        put_buffers(modules, buffers)
        for p, grad in grads.items():
            p.grad = grad


def _measure(block: nn.Module, u: torch.Tensor, balance: str, step_in_backward: bool = False) -> float:
    """``block``'s forward-and-backward cost on input u for ``balance`` ("memory": bytes,
    "time": s); with ``step_in_backward`` the gradients are freed as they are accumulated."""
    # the output's gradient as sum's (an expanded scalar, no allocation): a head's is freed
    # once the last layer's backward has used it, while a full tensor given to backward()
    # would stay alive through the whole backward and count one map too many
    def step() -> None:
        out = block(u)
        out.float().sum().backward()

    with _dry_run(block, u.device):
        step()  # warm-up: lazily allocated state is not the part's cost
        for p in block.parameters():  # but the gradients are: a step starts without them
            p.grad = None
        if balance == "memory":
            with _freeing_gradients(block, step_in_backward), memory.track_peak(u.device) as peak:
                step()
            return float(peak.bytes)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


@contextlib.contextmanager
def _freeing_gradients(block: nn.Module, free: bool) -> Iterator[None]:
    """Within, with ``free``: each of ``block``'s gradients is dropped once accumulated, as
    a step in the backward (localprop.optim.stepping_in_backward) drops it after its step,
    so that a dry run measures what such a step holds (the optimizer's own temporaries
    aside)."""
    def drop(p: torch.Tensor) -> None:
        p.grad = None

    handles = [p.register_post_accumulate_grad_hook(drop) for p in block.parameters() if p.requires_grad] \
        if free else []
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def localize(model: nn.Module | Sequence[nn.Module], rule: str | rules.Rule = "greedy", *,
             nodes: int | None = None, split_points: Sequence[str] | None = None,
             block: type | tuple[type, ...] | None = None, inputs: Sequence[str] = (),
             loss=None, num_classes: int | None = None, heads=None, optimizer: OptimizerFactory | None = None,
             backend: str | None = None, example_input: torch.Tensor | None = None, balance: str = "count",
             check_finite: bool = True, variable_dims: tuple[int, ...] | None = None,
             checkpoint: bool = False, max_grad_norm: float | None = None, hooks: bool = False,
             output=None, lean: bool = False, step_in_backward: bool = False) -> LocalSequential | HookedNetwork:
    """Make ``model`` a chain of nodes that learn locally; its own modules are trained in
    place (after training, ``model`` is the trained model).

    Two ways to cut a model:

    - an ``nn.Sequential`` or a list of blocks (without ``split_points`` or ``block``): each
      child with parameters starts a node, which also takes the parameter-free children
      after it (ReLU, pooling, ...);
    - any ``nn.Module``: its ``forward`` is traced by torch.fx and cut at the start of
      modules, so each node keeps the functional ops (``F.relu``, ``torch.flatten``,
      residual adds) that run in it (see :mod:`localprop.trace` for why tracing). The
      blocks are the outermost children of ``nn.Sequential`` / ``nn.ModuleList``
      containers (a ResNet's BasicBlocks, a transformer's layers), or the instances of
      ``block``, or else the model's children with parameters; they are called whole, so
      their own code needs no tracing. Code before the first block (a stem, embeddings)
      joins the first node, code after the last (pooling, the classifier) the last node.
      Traced code that reads ``self.training`` as a flag (``F.dropout(x,
      training=self.training)``) follows the network's mode; code whose ops differ by
      mode is a TypeError (see :func:`localprop.trace.traced_in_both_modes`);
    - ``hooks=True``, any ``nn.Module`` whose forward cannot be traced (HuggingFace's): the
      model runs its own forward and each node learns in a hook at the module the next node
      starts at (see :mod:`localprop.hooked`); rules greedy, bp and pgl, no pipeline.

    Args:
        model: the model: any ``nn.Module``, an ``nn.Sequential`` or a list of blocks.
        rule, loss, num_classes, heads, optimizer, backend, check_finite, variable_dims, max_grad_norm,
            step_in_backward: as
            in :class:`LocalSequential` (``loss`` e.g. "mse" or a callable; ``num_classes``
            is inferred from the model's output).
        nodes: K, group the blocks into K contiguous, balanced nodes (default: one per block).
        split_points: instead of ``nodes``, the module names each new node starts at
            (``["layer2", "layer3", "layer4"]``: 4 nodes), the model's own qualified names.
        block: a module class (or tuple of classes) whose instances are the blocks (as in
            FSDP's wrap policy: ``block=GPT2Block``).
        inputs: forward parameters with a default that are still given per batch, as
            keyword arguments of train_step / forward / predict (``attention_mask``);
            parameters without a default always are, and others are fixed at their default.
        balance: what the K nodes balance (see :func:`part_costs`): "count" of blocks
            (default), "params", "memory" (each block's measured step memory, so that no
            node's autograd working set, e.g. a high-resolution stage's, sets the step's
            peak alone; measured with each gradient freed as it arrives under
            ``step_in_backward``; for an nn.Sequential its pooling layers may then start nodes
            rather than end them, whichever measures the lower peak, see
            :func:`units`) or "time"; "memory" and "time" need ``example_input``.
        example_input: a batch [B, ...] for the dry run that finds every node's output shape
            (and so its head); without it the dry run happens on the first batch.
        checkpoint: checkpointing inside each node: every block is recomputed during its
            node's local backward, and so is the code between blocks of a traced model (a
            stem, a classifier) as one segment per run, so a local step holds the node's
            boundary tensors and one segment's activations, not all of its blocks'; a
            traced node of one block recomputes the block's first half instead
            (torch.utils.checkpoint: a block's forward runs twice; the recomputation sees
            the buffers the first forward saw and leaves them as it left them, so
            BatchNorm's statistics and spectral normalisation move once a step, see
            :mod:`localprop.recompute`).

        hooks: train through hooks on the model's own forward instead of a traced split
            (split points and ``nodes`` as above; ``balance`` "count" or "params").
        output: with ``hooks``, how to read the output tensor from what the forward returns
            (default: a tensor as is, a mapping's "logits", a tuple's first element).
        lean: BatchNorms whose backward keeps less (:mod:`localprop.lean`; the same
            arithmetic, parameters and state_dict keys): in an nn.Sequential or a list of
            blocks every BatchNorm directly followed by a ReLU runs as one
            :class:`~localprop.lean.BatchNormReLU`; every other BatchNorm, in any model,
            is replaced in place by a :class:`~localprop.lean.BatchNorm` sharing its
            tensors, whose backward holds one map less.

    Returns a :class:`LocalSequential` (a :class:`~localprop.hooked.HookedNetwork` with
    ``hooks``). Errors name the split point, module or op in the way.
    """
    if balance not in BALANCES:
        raise ValueError(f"localize: balance must be one of {', '.join(BALANCES)}, got {balance!r}")
    common = {"rule": rule, "num_classes": num_classes, "loss": loss, "heads": heads, "optimizer": optimizer,
              "backend": backend, "check_finite": check_finite, "variable_dims": variable_dims,
              "max_grad_norm": max_grad_norm, "step_in_backward": step_in_backward}
    listed = isinstance(model, (list, tuple, nn.ModuleList))
    blocks = listed or (isinstance(model, nn.Sequential) and split_points is None and block is None and not inputs)
    if not (blocks or isinstance(model, nn.Module)):
        raise TypeError(f"localize() takes an nn.Module, an nn.Sequential or a list of nn.Module blocks, "
                        f"got {type(model).__name__}")
    replaced = make_lean(model) if lean and not blocks else []  # the blocks' own, by _localize_blocks
    try:
        if hooks:
            net = _localize_hooked(model, nodes, split_points, block, balance, checkpoint, output, common)
        elif blocks:
            net = _localize_blocks(model, nodes, balance, example_input, checkpoint, lean, common, replaced)
        else:
            net = _localize_traced(model, nodes, split_points, block, tuple(inputs), balance, example_input,
                                   checkpoint, common)
    except BaseException:  # the user's model as it was given
        for parent, name, former in replaced:
            setattr(parent, name, former)
        raise
    if isinstance(model, nn.Module):
        net._user_modules = (model,)  # net.train() / net.eval() switch the user's model too
    if example_input is not None:
        net.build(example_input)
    return net


def _localize_hooked(model, nodes, split_points, block, balance, checkpoint, output, common) -> HookedNetwork:
    """Any nn.Module, through hooks on its own forward (localprop.hooked)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"localize(hooks=True) takes an nn.Module, got {type(model).__name__}")
    if checkpoint:
        raise ValueError("localize(hooks=True): checkpoint=True needs the model cut into standalone nodes; "
                         "localize without hooks=True for it")
    if balance not in ("count", "params"):
        raise ValueError(f"localize(hooks=True): balance={balance!r} measures standalone blocks; give "
                         f"balance='count' or 'params'")
    if split_points is not None:
        starts = _given_starts(split_points, nodes)
    else:
        blocks = trace.find_blocks(model, block)
        if not blocks:
            raise ValueError(f"localize: {type(model).__name__} has no blocks to make nodes of; give split_points=")
        count = _node_count(model, blocks, nodes)
        costs = _block_costs(model, blocks, (), balance, None) if count < len(blocks) else None
        starts = _starts(blocks, count, costs)
    kept = {k: v for k, v in common.items() if k != "backend"}  # no fused ops: no backend
    return HookedNetwork(model, starts, output=output, **kept)


def _localize_blocks(model, nodes, balance, example_input, checkpoint, lean, common, replaced) -> LocalSequential:
    """An nn.Sequential or a list of blocks: a node per child with parameters, grouped;
    with ``lean``, the BatchNorms replaced inside the user's modules are added to ``replaced``."""
    children = list(model.children()) if isinstance(model, nn.Sequential) else list(model)
    if not all(isinstance(m, nn.Module) for m in children):
        raise TypeError("localize() takes a list of nn.Module blocks")
    if not children:
        raise ValueError("localize() got a model with no blocks")
    if lean:  # pairs in the Sequential's own layers; inside its other modules, lean BatchNorms
        children = lean_layers(children)
        for m in children:
            replaced += make_lean(m)
    if nodes is not None and balance == "memory":
        blocks = join(*_memory_parts(children, nodes, example_input, common["step_in_backward"]), checkpoint)
    else:
        parts = units(children)
        costs = part_costs(parts, balance, example_input) if nodes is not None else None
        blocks = split_balanced(parts, len(parts) if nodes is None else nodes, costs, checkpoint)
    return LocalSequential(*blocks, **common)


def _memory_parts(children: list[nn.Module], nodes: int, example: torch.Tensor | None, step_in_backward: bool):
    """(parts, counts) for balance="memory": for each placement of pooling layers (ending
    a unit, or starting the next: see :func:`units`), the split of least summed part cost
    (:func:`part_costs`), then refined on measured group peaks (:func:`_refine`); the
    placement whose nodes measure the lower largest peak wins. The parts' costs only add
    up approximately (a group also holds the gradients between its parts), so the split
    is checked on what a whole group measures. ``step_in_backward``: measured with the
    gradients freed as they arrive (see :func:`part_costs`)."""
    _check_nodes(nodes, len(units(children)))  # pools starting units only add units
    best = None
    for pool_first in (False, True):
        parts = units(children, pool_first)
        if best is not None and parts == best[0]:
            continue
        costs = part_costs(parts, "memory", example, step_in_backward)
        counts, peak = _refine(parts, group_counts(len(parts), nodes, costs), example, step_in_backward)
        if best is None or peak < best[2]:
            best = (parts, counts, peak)
    return best[0], best[1]


def _refine(parts: list[list[nn.Module]], counts: list[int], example: torch.Tensor,
            step_in_backward: bool) -> tuple[list[int], float]:
    """(counts, largest peak): ``counts`` after moving node boundaries one part at a time
    while that lowers the largest measured group peak, and that peak. Each group is
    measured once on a dry run (:func:`_measure`); the inputs of every part are kept for
    it (a forward's outputs at ``example``'s batch, no autograd)."""
    inputs = [u for _, u in _dry_inputs(parts, example)]
    cache: dict[tuple[int, int], float] = {}

    def peak(i: int, j: int) -> float:  # the group's input is alive through its step too
        if (i, j) not in cache:
            group = nn.Sequential(*[m for part in parts[i:j] for m in part])
            cache[i, j] = _measure(group, inputs[i], "memory", step_in_backward) + memory.tensor_bytes([inputs[i]])
        return cache[i, j]

    def peaks(cuts: list[int]) -> list[float]:
        return [peak(a, b) for a, b in zip(cuts, cuts[1:])]

    cuts = [0] + list(itertools.accumulate(counts))
    changed = True
    while changed:
        changed = False
        for k in range(1, len(cuts) - 1):
            for move in (-1, 1):
                trial = cuts[:k] + [cuts[k] + move] + cuts[k + 1:]
                if not trial[k - 1] < trial[k] < trial[k + 1]:
                    continue
                old, new = peaks(cuts), peaks(trial)
                if max(new) < max(old):
                    cuts, changed = trial, True
    return [b - a for a, b in zip(cuts, cuts[1:])], max(peaks(cuts))


def _localize_traced(model, nodes, split_points, block, inputs, balance, example_input, checkpoint,
                     common) -> LocalSequential:
    """Any nn.Module, by its traced graph (localprop.trace)."""
    blocks = trace.find_blocks(model, block)
    if not blocks and split_points is None:
        raise ValueError(f"localize: {type(model).__name__} has no blocks to make nodes of (no child module has "
                         f"parameters); give split_points= or block=, or build the nodes yourself")
    if split_points is not None:
        starts = _given_starts(split_points, nodes)
        leaves = starts + [b for b in blocks if not any(_related(b, s) for s in starts)]
    else:
        blocks = _called(model, blocks, inputs)
        count = _node_count(model, blocks, nodes)
        if balance == "memory" and (count < len(blocks) or nodes is not None):
            starts = _memory_starts(model, blocks, inputs, count, example_input, checkpoint,
                                    common["step_in_backward"])
        else:
            costs = _block_costs(model, blocks, inputs, balance, example_input) if count < len(blocks) else None
            starts = _starts(blocks, count, costs)
        leaves = blocks
    cut = trace.split(model, starts, leaves, inputs, checkpoint)
    net = LocalSequential(*cut.nodes, **common)
    net.input_names, net.input_defaults = cut.input_names, cut.defaults
    for node in cut.nodes:
        node.values = net.batch_inputs  # one dict: side values computed by a node reach the later ones
    return net


def _given_starts(split_points: Sequence[str], nodes: int | None) -> list[str]:
    """The split points given, checked: not empty, not with ``nodes``."""
    if nodes is not None:
        raise ValueError("localize: give nodes= or split_points=, not both")
    starts = list(split_points)
    if not starts:
        raise ValueError("localize: split_points is empty; give at least one module name (or nodes=)")
    return starts


def _node_count(model: nn.Module, blocks: list[str], nodes: int | None) -> int:
    """K for ``nodes`` (None: one node per block), checked against the model's blocks."""
    count = len(blocks) if nodes is None else nodes
    if not isinstance(count, int) or not 1 <= count <= len(blocks):
        raise ValueError(f"localize: nodes must lie in [1, {len(blocks)}] for {type(model).__name__}, which "
                         f"has {len(blocks)} blocks ({', '.join(blocks[:3])}{', ...' if len(blocks) > 3 else ''}), "
                         f"got {count!r}")
    return count


def _called(model: nn.Module, blocks: list[str], inputs) -> list[str]:
    """``blocks`` in the order the model's forward calls them (blocks it never calls dropped)."""
    order = [n.target for n in trace.trace(model, set(blocks), inputs).graph.nodes if n.op == "call_module"]
    return sorted((b for b in blocks if b in order), key=order.index)


def _starts(blocks: list[str], count: int, costs: list[float] | None) -> list[str]:
    """The blocks that start nodes 1..count-1 when ``blocks`` are grouped into ``count``."""
    firsts, at = [], 0
    for c in group_counts(len(blocks), count, costs)[:-1]:
        at += c
        firsts.append(blocks[at])
    return firsts


def _block_costs(model, blocks, inputs, balance, example) -> list[float] | None:
    """A cost per block for ``balance`` (see :func:`part_costs`): parameters, or measured on
    a dry run through the model cut at every block (the code before the first block
    counted with it)."""
    if balance == "count":
        return None
    modules = dict(model.named_modules())
    if balance == "params":
        return [float(sum(p.numel() for p in modules[b].parameters())) for b in blocks]
    return [cost for cost, _ in _traced_costs(model, blocks[1:], blocks, inputs, balance, example)]


def _memory_starts(model, blocks, inputs, count, example, checkpoint, step_in_backward) -> list[str]:
    """The blocks that start nodes 1..count-1 for balance="memory". The units are the
    blocks and, when it has parameters, the code before the first one (a stem), measured
    each on a dry run. A node's peak is estimated as its units' summed costs, or with
    ``checkpoint`` (a node of several units recomputes one at a time) as its costliest
    unit's plus the inputs it keeps of the others. Two splits of least largest estimate
    are candidates, with the stem joining the first block and with the stem free to be a
    node alone; the estimates only approximate a node's peak, so where the two differ
    their nodes are measured and the lower largest peak wins. ``step_in_backward``: every
    measurement with the gradients freed as they arrive (see :func:`part_costs`)."""
    measure = functools.partial(_traced_costs, model, blocks=blocks, inputs=inputs, balance="memory",
                                example=example, step_in_backward=step_in_backward)
    stem = trace.split(model, blocks[:1], blocks, inputs).nodes[0]
    if not any(True for _ in stem.parameters()):  # nothing before the first block learns: it joins the block
        costs, held = zip(*measure(blocks[1:]))
        return _estimated_starts(costs, held, blocks, count, checkpoint)
    costs, held = zip(*measure(blocks))  # the stem, each block
    joined, alone = (_estimated_starts(costs, held, [None, *blocks], count, checkpoint, stem_alone)
                     for stem_alone in (False, True))
    if joined == alone:
        return joined
    peaks = [max(c + b for c, b in measure(starts, checkpoint=checkpoint)) for starts in (joined, alone)]
    return joined if peaks[0] <= peaks[1] else alone


def _estimated_starts(costs, held, units, count, checkpoint, stem_alone=True) -> list[str]:
    """The starts of the split of ``units`` (their names, None for a stem; a cost and the
    bytes of its input each) whose largest estimated node peak is least (see
    :func:`_memory_starts`); ``stem_alone=False``: the first unit not a node by itself."""
    def peak(j: int, k: int) -> float:
        if (j, k) == (0, 1) and not stem_alone:
            return math.inf
        if checkpoint and k - j > 1:  # unit i recomputed while the inputs kept of units j+1..i are alive
            return max(costs[i] + sum(held[j + 1:i + 1]) for i in range(j, k))
        return sum(costs[j:k])
    return [units[i] for i in itertools.accumulate(group_counts(len(units), count, costs, peak)[:-1])]


def _traced_costs(model, starts, blocks, inputs, balance, example, checkpoint=False,
                  step_in_backward=False) -> list[tuple[float, int]]:
    """(cost for ``balance``, input bytes) of each node of ``model`` cut at ``starts``
    (checkpointed inside with ``checkpoint``), on a dry run from ``example`` (gradients
    freed as they arrive with ``step_in_backward``)."""
    if example is None:
        raise ValueError(f"localize(balance={balance!r}) measures each block on a dry run: give example_input")
    cut = trace.split(model, starts, blocks, inputs, checkpoint)
    values = dict(cut.defaults)
    out, h = [], example
    for node in cut.nodes:
        node.values = values
        out.append((_measure(node, h, balance, step_in_backward), memory.tensor_bytes([h])))
        with torch.no_grad(), _dry_run(node, h.device):
            h = node(h)
    return out


def _related(a: str, b: str) -> bool:
    """True if module ``a`` is ``b``, inside it or contains it."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")
