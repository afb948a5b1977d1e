"""Local learning on a model's own forward, through hooks: ``localize(model, hooks=True)``.

Why hooks beside the traced split (:mod:`localprop.trace`): torch.fx cannot trace the
forward of many models people use (HuggingFace's build attention masks, caches and
output classes at run time), and they should still train locally. Here the model runs
its own forward, whole and unchanged; a forward pre-hook on each module a node starts at
(a split point) takes the previous node's local step there: the module's input h_k is
that node's output, its head's loss is computed, backpropagated to that node's parameters
only, and its optimizer steps, before the model goes on from the detached h_k. So one
node's autograd graph is alive at a time, as in every local rule's loop.

What a node is: the model's computation between two split points. Its parameters are
found on a dry run, as those the node's output (or the model's output, for the last
node) reaches through the autograd graph by operations made since the node began (told
apart by autograd's sequence numbers): a parameter used by several nodes (tied
embeddings) is stepped by the last of them, after every one of them has added its
gradient. A node's backward is restricted to those parameters (and its head's), so no
gradient crosses a split point, even through a value that skips one (a residual stream
kept by the model's forward).

What hooks cannot give, for which the traced split exists: standalone nodes (so no
pipeline across processes, no ``submodel``, no early exits), and rules that run a node
twice or pass messages between nodes (sgr, critic, bll, locprop). Rules here: "greedy",
"bp" and "pgl" with greedy local steps.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Mapping
from typing import Callable, Sequence

import torch
from torch import nn

from . import objectives, optim, rules
from .engine import Prediction, _eval_mode, _head_factory, _shorter, _shorter_inputs
from .errors import LABEL_DTYPES, check_finite, check_parameters
from .heads import HeadFactory
from .network import Network, OptimizerFactory
from .summary import NodeSummary, Summary

#: the rules a hooked network trains with, and why the others cannot be
WHY_NOT = {
    "sgr": "sgr reruns a node on its input (its penalty needs the input gradient of the next node's loss)",
    "critic": "critic trains each node from the next node's per-sample losses, sent back across the split",
    "bll": "bll sends a top-down message from the later nodes before every step",
    "locprop": "locprop runs nodes out of order, which the model's own forward cannot",
    "bp+checkpoint": "checkpointing by segments needs the model's forward cut into pieces (the model's own "
                     "activation checkpointing, e.g. HuggingFace's activation_checkpointing_enable(), works with "
                     "rule bp)",
}

#: why exits and ensembles are refused on hooked networks
_APART = ("exits and ensembles run nodes apart, which hooks on the model's own forward cannot; localize without "
          "hooks=True for them")


class HookedNetwork(Network):
    """A model trained node by node through hooks on its own forward (see the module).

    Args:
        model: any ``nn.Module`` (trained in place; ``net.model``).
        starts: qualified names of the modules each node after the first starts at, in
            the order the model's forward calls them (K - 1 names for K nodes).
        rule: "greedy" (default), "bp", "pgl" (global steps end-to-end backprop of the
            whole model, not checkpointed) or such a Rule.
        loss, num_classes, heads, optimizer, check_finite, max_grad_norm, variable_dims,
            step_in_backward: as
            in :class:`~localprop.LocalSequential`.
        output: how to read the model's output tensor from what its forward returns:
            None (a tensor as is; a mapping's "logits", as HuggingFace's outputs hold it;
            a tuple's first element) or a callable ``returned -> tensor``.

    Built on the first batch (or :meth:`build`) by a dry run of two samples, which finds
    each node's output shape (its head), its parameters and the call order of the starts.
    """

    def __init__(self, model: nn.Module, starts: Sequence[str], rule: str | rules.Rule = "greedy", *,
                 loss=None, num_classes: int | None = None, heads: str | HeadFactory | None = None,
                 optimizer: OptimizerFactory | None = None, check_finite: bool = True,
                 max_grad_norm: float | None = None, variable_dims: tuple[int, ...] | None = None,
                 output: Callable | None = None, step_in_backward: bool = False) -> None:
        super().__init__(_hooked_rule(rule), optimizer, None, check_finite, max_grad_norm, step_in_backward)
        modules = dict(model.named_modules())
        for name in starts:
            if name not in modules or not name:
                raise ValueError(f"localize(hooks=True): {type(model).__name__} has no module {name!r} to start "
                                 f"a node at; its children: {', '.join(n for n, _ in model.named_children())}")
        if len(set(starts)) != len(starts):
            raise ValueError(f"localize(hooks=True): a split point is named twice in {list(starts)}")
        if output is not None and not callable(output):
            raise TypeError(f"output= must be a callable (what the model returns) -> tensor, got {output!r}")
        self.model = model
        self.starts = list(starts)
        self.objective = objectives.resolve(loss)
        self.num_classes = num_classes
        self.head_factory = _head_factory(heads)
        self.token_features = heads == "tokens"
        self.variable_dims = None if variable_dims is None else tuple(variable_dims)
        self.output = output
        self.heads = nn.ModuleList()
        self.input_dtype: torch.dtype | None = None
        self.input_spec: tuple[int | None, ...] = ()  #: per-sample shape of x, None where it varies
        self._example_inputs: dict = {}  # the dry run's keyword inputs and per-sample x shape (FLOPs)
        self._example_shape: tuple[int, ...] = ()
        #: per-sample shapes of each node's output (the last: the model's), None where it varies
        self.output_specs: list[tuple[int | None, ...]] = []
        self._reached: list[list[str]] = []   # per node: names of the parameters its loss trains
        self._owned: list[list[str]] = []     # per node: the parameters its optimizer steps
        self._optimizers: list[torch.optim.Optimizer | None] = []
        self._wrt: list[list[nn.Parameter]] | None = None  # see _backward_inputs

    @property
    def node_names(self) -> list[str]:
        return [str(k) for k in range(len(self.starts) + 1)]

    # ---- what the rules' machinery asks of a network, which a hooked one has not -----
    def topology(self):
        raise TypeError("a network made by localize(hooks=True) has no standalone nodes to run apart "
                        "(pipelines, rules other than greedy/bp/pgl): localize without hooks=True, by tracing")

    def feeds(self, x, y):
        return self.topology()

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every node's optimizer (over its own parameters and its head's), in node order."""
        return [o for o in self._optimizers if o is not None]

    def _optimizer_owners(self) -> list[str]:
        return [f"node {k!r}" for k, o in zip(self.node_names, self._optimizers) if o is not None]

    # ---- building ---------------------------------------------------------------------
    def build(self, example: torch.Tensor, **inputs) -> HookedNetwork:
        """The dry run (eval mode, two samples, no update): each node's output shape and
        parameters, the starts' call order; then heads and optimizers."""
        if self.built:
            return self
        self._check_x(example)
        self.input_dtype = example.dtype
        tokens = not example.is_floating_point()
        self.token_features = self.token_features or tokens
        if self.variable_dims is None:
            self.variable_dims = tuple(range(example.dim() - 1)) if tokens else ()
        inputs = {k: v[:2] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == example.shape[0] else v
                  for k, v in inputs.items()}
        with _eval_mode(self):
            with torch.enable_grad():  # the parameters are found in the autograd graph
                shapes, reached = self._dry_run(example[:2], inputs, graph=True)
            shorter = _shorter(example[:2], self.variable_dims)
            with torch.no_grad():
                other = shapes if shorter is None else self._dry_run(shorter, _shorter_inputs(inputs, shorter))[0]
        self.output_specs = [tuple(a if a == b else None for a, b in zip(s, t)) for s, t in zip(shapes, other)]
        out = self.output_specs[-1]
        if self.objective.classes:
            self.num_classes = objectives.logits_classes(f"node {len(self.starts)}", out, self.num_classes)
        self._reached = reached
        self.input_spec = tuple(None if d in self.variable_dims else s for d, s in enumerate(example.shape[1:]))
        self._example_inputs, self._example_shape = inputs, tuple(example.shape[1:])
        last_user = {name: k for k, names in enumerate(reached) for name in names}
        self._owned = [[n for n in names if last_user[n] == k] for k, names in enumerate(reached)]
        if self.rule.uses_heads:
            for k, shape in enumerate(shapes[:-1]):
                head = self.head_factory(k, shape, out[-1] if out and out[-1] is not None else 1, len(out) > 1,
                                         self.token_features)
                like = next(self.model.parameters(), None)
                self.heads.append(head if like is None else head.to(device=like.device, dtype=like.dtype))
        self._optimizers = [self.optimizer_factory(params) if (params := self._node_parameters(k)) else None
                            for k in range(len(self.starts) + 1)]
        for k, optimizer in enumerate(self._optimizers):
            if self.step_in_backward and optimizer is not None:
                optim.check_per_parameter(optimizer, str(k))
        self.built = True
        return self

    def _dry_run(self, x: torch.Tensor, inputs: dict, graph: bool = False):
        """(per-sample output shape of every node, and with ``graph`` the names of the
        parameters each node's output reaches) on x, in the call order of the starts."""
        shapes: list[tuple[int, ...]] = []
        reached: list[list[str]] = []
        order: list[str] = []
        names = {p: n for n, p in self.model.named_parameters()}

        def boundary(k, module, args, kwargs):
            h, put = _boundary_tensor(self.starts[k], args, kwargs)
            if self.starts[k] in order:
                raise RuntimeError(f"localize(hooks=True): split point {self.starts[k]!r} is called more than once "
                                   f"by the model's forward; a node must start at a module called once a step")
            order.append(self.starts[k])
            shapes.append(tuple(h.shape[1:]))
            if graph:
                reached.append(_parameters_reached(h, names, since[-1]))
                since.append(_graph_clock())
            return put(h.detach())

        since = [_graph_clock()] if graph else []  # where each node's operations begin in the graph
        with self._hooks(boundary):
            returned = self.model(x, **inputs)
        missing = [s for s in self.starts if s not in order]
        if missing:
            raise RuntimeError(f"localize(hooks=True): split point {missing[0]!r} is never called by "
                               f"{type(self.model).__name__}'s forward")
        if order != self.starts:  # nodes follow the forward's order, whatever the names' order
            self.starts = order
        out = self._read_output(returned)
        shapes.append(tuple(out.shape[1:]))
        if graph:
            reached.append(_parameters_reached(out, names, since[-1]))
        return shapes, reached

    def _backward_inputs(self) -> list[list[nn.Parameter]]:
        """Per node, the parameters its loss's backward accumulates into: those it reaches,
        then its head's. Resolved from the names once, not at every step (again after a
        move that may replace Parameters, see _apply)."""
        if self._wrt is None:
            params = dict(self.model.named_parameters())
            self._wrt = [[params[n] for n in names] + (list(self.heads[k].parameters()) if k < len(self.heads) else [])
                         for k, names in enumerate(self._reached)]
        return self._wrt

    def _apply(self, fn, recurse: bool = True) -> HookedNetwork:
        self._wrt = None  # .to() may put new Parameters in the model
        return super()._apply(fn, recurse)

    def _check_backend_dtypes(self) -> None:
        """No fused ops run here: every dtype autograd runs is fine."""

    def _node_parameters(self, k: int) -> list[nn.Parameter]:
        """The parameters node k's optimizer steps: those it owns, then its head's."""
        params = dict(self.model.named_parameters())
        head = list(self.heads[k].parameters()) if k < len(self.heads) else []
        return [params[n] for n in self._owned[k]] + head

    @contextlib.contextmanager
    def _hooks(self, boundary: Callable):
        """``boundary(k, module, args, kwargs)`` as a forward pre-hook on node k+1's start."""
        modules = dict(self.model.named_modules())
        handles = [modules[name].register_forward_pre_hook(functools.partial(_outside_backward, boundary, k, name),
                                                           with_kwargs=True)
                   for k, name in enumerate(self.starts)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _read_output(self, returned) -> torch.Tensor:
        """The model's output tensor from what its forward returned (see ``output``)."""
        return output_tensor(self.model, returned, self.output)

    # ---- training ---------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, **inputs) -> rules.StepResult:
        """Train every node once on x [B, ...] (float, or integer token ids) and its targets
        y (as LocalSequential.train_step); ``inputs``: keyword inputs of the model's forward
        (``attention_mask``, ...), passed to it as given. Returns the per-node losses."""
        self._check_x(x)
        if not self.built:
            self.build(x, **inputs)
        y = self._check_y(x, y)
        step = self.steps
        if self.rule.name == "bp" or self.rule.is_global(step):
            result = self._global_step(x, y, inputs, step)
        else:
            result = self._local_step(x, y, inputs, step)
        if isinstance(self.rule, rules.PGL):
            result.extra["global"] = self.rule.is_global(step)
        self.steps += 1
        return result

    def _local_step(self, x, y, inputs, step) -> rules.StepResult:
        losses: dict[str, float] = {}

        def boundary(k, module, args, kwargs):
            h, put = _boundary_tensor(self.starts[k], args, kwargs)
            if str(k) in losses:
                raise RuntimeError(f"node {k}: split point {self.starts[k]!r} was called twice in one forward")
            head = self.heads[k]
            loss = head.loss(h, y, self.objective) if hasattr(head, "loss") else self.objective(head(h), y)
            losses[str(k)] = self._learn(k, loss, step)
            return put(h.detach())

        with self._hooks(boundary):
            out = self._read_output(self.model(x, **inputs))
        last = len(self.starts)
        losses[str(last)] = self._learn(last, self.objective(out, y), step)
        return rules.StepResult(step, losses)

    def _learn(self, k: int, loss: torch.Tensor, step: int) -> float:
        """Node k learns from ``loss``: backward into its parameters and its head's only,
        one step of its optimizer (clipped first with max_grad_norm), gradients freed."""
        if self.check_finite:
            check_finite(loss, str(k), step, "loss")
        wrt, optimizer = self._backward_inputs()[k], self._optimizers[k]
        inside = self.step_in_backward and optimizer is not None
        with optim.stepping_in_backward(optimizer) if inside else contextlib.nullcontext():
            if wrt:
                torch.autograd.backward(loss, inputs=wrt)
        if optimizer is not None:
            self._step_optimizer(k, optimizer, step, stepped_in_backward=inside)
        return float(loss.detach())

    def _step_optimizer(self, k: int, optimizer: torch.optim.Optimizer, step: int,
                        stepped_in_backward: bool = False) -> None:
        stepped = [p for group in optimizer.param_groups for p in group["params"]]
        if not stepped_in_backward:
            if self.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(stepped, self.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.check_finite:
            check_parameters(stepped, self, str(k), step)

    def _global_step(self, x, y, inputs, step) -> rules.StepResult:
        """End-to-end backprop of the model's loss, then every node's optimizer (heads untouched)."""
        last = str(len(self.starts))
        loss = self.objective(self._read_output(self.model(x, **inputs)), y)
        if self.check_finite:
            check_finite(loss, last, step, "loss")
        loss.backward()
        if self.max_grad_norm is not None:  # over the whole model, as under bp
            nn.utils.clip_grad_norm_(list(self.model.parameters()), self.max_grad_norm)
        for optimizer in self.optimizers():  # every node steps before any is checked, as under bp
            optimizer.step()
        for k, optimizer in enumerate(self._optimizers):
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                if self.check_finite:
                    check_parameters([p for g in optimizer.param_groups for p in g["params"]], self, str(k), step)
        return rules.StepResult(step, {last: float(loss.detach())})

    # ---- checks -----------------------------------------------------------------------
    def _check_x(self, x) -> None:
        if not isinstance(x, torch.Tensor) or not (x.is_floating_point() or x.dtype in LABEL_DTYPES):
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"node 0: x must be a floating-point tensor or integer token ids, got {got}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"node 0: empty batch (x has shape {list(x.shape)})")
        like = next(self.model.parameters(), None)
        if like is not None and x.device != like.device:
            raise ValueError(f"node 0: x is on {x.device}, the model's parameters on {like.device}")
        if self.input_dtype is not None and x.is_floating_point() != self.input_dtype.is_floating_point:
            raise TypeError(f"node 0: the network was built for x of {self.input_dtype}, got {x.dtype}")
        if self.check_finite and x.is_floating_point():
            check_finite(x, "0", self.steps, "input x")

    def _check_y(self, x: torch.Tensor, y) -> torch.Tensor:
        """y checked by the objective against the model's output, before any node learns."""
        if isinstance(y, torch.Tensor) and y.device != x.device:
            raise ValueError(f"the target y is on {y.device}, x on {x.device}")
        spec = self.output_specs[-1]
        if len(spec) == 2 and spec[0] is None and x.dim() >= 2 and 0 in self.variable_dims:
            spec = (x.shape[1], spec[1])  # the positions of the output are those of x
        y = self.objective.check_target("y", y, x.shape[0], spec)
        if self.check_finite and y.is_floating_point():
            check_finite(y, str(len(self.starts)), self.steps, "target y")
        return y

    # ---- inference ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, **inputs) -> torch.Tensor:
        """The model's output tensor on x (its own forward, no hooks)."""
        self._check_x(x)
        if not self.built:
            self.build(x, **inputs)
        return self._read_output(self.model(x, **inputs))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, exit_threshold: float | None = None, ensemble: bool = False,
                **inputs) -> Prediction:
        """Class predictions of the model (argmax of its output) in eval mode. Early exits
        and ensembles need standalone nodes: localize without hooks=True for them."""
        if exit_threshold is not None or ensemble:
            raise ValueError(f"predict: {_APART}")
        if not self.objective.classes:
            raise ValueError(f"predict: loss {self.objective.name!r} has no classes to predict; use net(x)")
        with _eval_mode(self):
            out = self(x, **inputs)
        labels = out.argmax(-1)
        return Prediction(labels, torch.full(labels.shape[:1], len(self.starts), dtype=torch.int64,
                                             device=labels.device))

    def choose_exits(self, x: torch.Tensor, y: torch.Tensor, **options):
        """Not offered here (see :meth:`predict`): raises ValueError."""
        raise ValueError(f"choose_exits: {_APART}")

    def describe(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, **inputs) -> Summary:
        """Every node's output shape, parameters (those its optimizer steps) and forward
        FLOPs per sample (counted between its split points on a two-sample dry run), with
        its head's: what local learning adds to the model. With a batch (x, y), also the
        allocator's peak while each node ran in a training step (its forward, and its
        local backward and update), measured on a copy (this network, and the RNG, untouched)."""
        if x is not None and not self.built:
            self.build(x, **inputs)
        if not self.built:
            raise RuntimeError("describe(): build the network first (build(x) or a first batch)")
        peaks = [None] * (len(self.starts) + 1) if x is None else self._step_peaks(x, y, inputs)
        from torch.utils.flop_counter import FlopCounterMode

        like = next(self.model.parameters())
        example = torch.zeros(2, *self._example_shape, dtype=self.input_dtype, device=like.device)
        totals, entering = [], []  # the FLOPs counted when each split point is reached, its input
        with _eval_mode(self), torch.no_grad(), FlopCounterMode(display=False) as counter:
            def boundary(k, module, args, kwargs):
                totals.append(counter.get_total_flops())
                entering.append(_boundary_tensor(self.starts[k], args, kwargs)[0])

            with self._hooks(boundary):
                self.model(example, **self._example_inputs)
            totals.append(counter.get_total_flops())
        flops = [(b - a) // 2 for a, b in zip([0] + totals, totals)]  # per sample of the two
        head_flops = []
        for head, h in zip(self.heads, entering):
            with _eval_mode(self), torch.no_grad(), FlopCounterMode(display=False) as counter:
                head(h)
            head_flops.append(counter.get_total_flops() // 2)
        rows = []
        for k, shape in enumerate(self.output_specs):
            head = sum(p.numel() for p in self.heads[k].parameters()) if k < len(self.heads) else 0
            own = sum(p.numel() for p in self._node_parameters(k)) - head
            label = "model start" if k == 0 else f"from {self.starts[k - 1]!r}"
            shape_in = self.input_spec if k == 0 else self.output_specs[k - 1]
            rows.append(NodeSummary(str(k), label, tuple(shape_in), tuple(shape), own, head, flops[k],
                                    head_flops[k] if k < len(head_flops) else 0, peaks[k]))
        return Summary(rows, self.rule.name)

    def _step_peaks(self, x, y, inputs) -> list[int | None]:
        """Per node, the allocator's peak while it ran in one training step of a copy. Node
        k's events: from the first module run inside its start (node k-1's local backward
        and update happen just before it, in the start's hook, and count for node k-1) to
        the first inside the next start."""
        from . import memory

        rng, trial = torch.get_rng_state(), copy.deepcopy(self)
        try:
            line = memory.timeline(trial, x, y, **inputs)
        finally:
            torch.set_rng_state(rng)
        peaks: list[int | None] = [None] * (len(self.starts) + 1)
        k = 0
        for event, peak in zip(line.events, line.peaks):
            module = event.split(" ")[1] if event.startswith("forward ") else ""
            while k < len(self.starts) and (module == f"model.{self.starts[k]}"
                                            or module.startswith(f"model.{self.starts[k]}.")):
                k += 1
            if event not in ("start", "end"):
                peaks[k] = peak if peaks[k] is None else max(peaks[k], peak)
        return peaks

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}, starts={self.starts}"


def output_tensor(model: nn.Module, returned, output: Callable | None = None) -> torch.Tensor:
    """The output tensor in what ``model``'s forward returned: ``output(returned)`` when
    given, else a tensor as is, a mapping's "logits" (HuggingFace's outputs) or a tuple's
    first element; TypeError naming the model otherwise."""
    if output is not None:
        out = output(returned)
    elif isinstance(returned, Mapping) and "logits" in returned:
        out = returned["logits"]
    elif isinstance(returned, (tuple, list)) and returned:
        out = returned[0]
    else:
        out = returned
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{type(model).__name__}'s forward returned {type(returned).__name__}, whose output tensor "
                        f"could not be found; give output=, a callable (what the forward returns) -> the output "
                        f"tensor")
    return out


def _hooked_rule(rule) -> rules.Rule:
    """The rule, if a hooked network can train with it; ValueError with the reason otherwise."""
    if rule == "pgl":  # global steps of a hooked model are not checkpointed
        return rules.PGL(checkpoint=False)
    resolved = rules.resolve(rule)
    if isinstance(resolved, rules.PGL):
        if not isinstance(resolved.local, rules.Greedy) or resolved.global_state != "shared" \
                or resolved.global_rule.checkpoint:
            raise ValueError("localize(hooks=True) trains pgl with greedy local steps, shared optimizer state and "
                             "un-checkpointed global steps: PGL('greedy', checkpoint=False); localize without "
                             "hooks=True for the others")
        return resolved
    if type(resolved) in (rules.Greedy, rules.BP) and resolved.name in ("greedy", "bp"):
        return resolved
    why = WHY_NOT.get(resolved.name, f"rule {resolved.name!r} is not one of greedy, bp, pgl")
    raise ValueError(f"localize(hooks=True) cannot train with rule {resolved.name!r}: {why}; localize without "
                     f"hooks=True (a traced split into standalone nodes) for it")


def _outside_backward(boundary: Callable, k: int, name: str, module, args, kwargs):
    """The pre-hook of node k+1's start: ``boundary`` in the model's forward; inside a
    backward, where a checkpoint (the model's own activation checkpointing, e.g.
    HuggingFace's gradient_checkpointing_enable) recomputes the block, only the input is
    detached, as in the forward it replays, and nothing learns again."""
    if torch._C._current_graph_task_id() != -1:
        h, put = _boundary_tensor(name, args, kwargs)
        return put(h.detach())
    return boundary(k, module, args, kwargs)


def _boundary_tensor(name: str, args: tuple, kwargs: dict):
    """(h, put): the activation entering the module ``name`` (its first positional argument,
    else its first floating-point keyword argument) and ``put(t)``, the pre-hook's return
    value that calls the module with t in its place."""
    if args and isinstance(args[0], torch.Tensor):
        h = args[0]
        put = lambda t: ((t, *args[1:]), kwargs)  # noqa: E731
    else:
        key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
        if key is None:
            raise TypeError(f"split point {name!r}: its call takes no tensor to start a node from (a node starts "
                            f"at a module whose first argument is the activation); split at another module")
        h = kwargs[key]
        put = lambda t: (args, {**kwargs, key: t})  # noqa: E731
    if not h.is_floating_point():
        raise TypeError(f"split point {name!r}: its input is {h.dtype}, not an activation a node can learn "
                        f"from; split at a later module")
    return h, put


def _graph_clock() -> int:
    """The sequence number of an autograd node made now: every node the forward makes
    later has a larger one (one thread)."""
    return (torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr()


def _parameters_reached(t: torch.Tensor, names: dict, since: int) -> list[str]:
    """Names of the parameters (of ``names``: parameter -> name) whose gradient ``t``'s
    autograd graph accumulates through operations made after ``since`` (see
    :func:`_graph_clock`): those of the node that ends at t, not those of earlier nodes
    whose values reach t beside the boundary (a skip connection), in the order of ``names``."""
    found, seen, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen or fn._sequence_nr() <= since:
            continue
        seen.add(fn)
        for child, _ in fn.next_functions:
            variable = getattr(child, "variable", None)  # an AccumulateGrad: the leaf it accumulates into
            if variable is not None:
                if variable in names:
                    found.add(variable)
            else:
                stack.append(child)
    return [n for p, n in names.items() if p in found]
