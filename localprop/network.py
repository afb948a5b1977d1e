"""What every network of nodes shares, whatever its shape: the rule, the per-node
optimizers, the backend, the step counter, and the state that lets training resume
exactly. :class:`~localprop.LocalSequential` (a chain) and :class:`~localprop.LocalGraph`
(any DAG) are its two shapes; rules see both through ``topology()`` and ``feeds()``."""
from __future__ import annotations

import abc
import copy
import functools
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import optim, rules
from .errors import check_float
from .ops import backends, fused_update
from .topology import Topology

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

#: the optimizer each node gets when none is given
DEFAULT_OPTIMIZER: OptimizerFactory = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)


class Network(nn.Module, abc.ABC):
    """Base of LocalSequential and LocalGraph.

    ``state_dict()`` holds everything needed to continue training exactly: parameters and
    buffers (nodes, heads, the rule's modules), and, as extra state, the step counter,
    every node's optimizer state and the rule's own optimizers' state, with the rule's
    identity and the optimizers' classes, which :meth:`load_state_dict` checks.
    """

    def __init__(self, rule: str | rules.Rule, optimizer: OptimizerFactory | None, backend: str | None,
                 check_finite: bool, max_grad_norm: float | None = None, step_in_backward: bool = False) -> None:
        super().__init__()
        self.rule = rules.resolve(rule)
        self.optimizer_factory = optimizer or DEFAULT_OPTIMIZER
        self.backend_request = backends.requested(backend)
        self.check_finite = check_finite
        self.max_grad_norm = None if max_grad_norm is None else \
            check_float(type(self).__name__, "max_grad_norm", max_grad_norm, 0, open_low=True)
        if step_in_backward and max_grad_norm is not None:
            raise ValueError(f"{type(self).__name__}: step_in_backward=True steps each parameter before the "
                             f"others' gradients exist, so their norm cannot be clipped (max_grad_norm="
                             f"{max_grad_norm}); use one or the other")
        self.step_in_backward = bool(step_in_backward)
        self.steps = 0
        self.built = False
        self._backend_for: dict[torch.device, str] = {}

    @abc.abstractmethod
    def topology(self) -> Topology:
        """Nodes in topological order, their inputs, and the goals."""

    @abc.abstractmethod
    def feeds(self, x, y) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """A batch as graph rules see it: (inputs by name, targets by name)."""

    # ---- building ---------------------------------------------------------------------
    @property
    def optimizer_factory(self) -> OptimizerFactory:
        """The factory ``params -> torch.optim.Optimizer`` each node's optimizer is made by."""
        return self._optimizer_factory

    @optimizer_factory.setter
    def optimizer_factory(self, factory: OptimizerFactory) -> None:
        # checked when set (the network's construction), not at the first step: an
        # optimizer instance would otherwise fail only as "'Adam' object is not callable"
        if isinstance(factory, torch.optim.Optimizer) or not callable(factory):
            what = "an optimizer instance" if isinstance(factory, torch.optim.Optimizer) else "not callable"
            raise TypeError(f"optimizer= must be a factory params -> torch.optim.Optimizer, called once per node "
                            f"on that node's parameters (each node has its own optimizer), got "
                            f"{type(factory).__name__} ({what}); for example "
                            f"optimizer=functools.partial(torch.optim.SGD, lr=0.1)")
        self._optimizer_factory = factory

    def _attach(self) -> None:
        """Once every node's shapes are known: the rule's state, then each node's optimizer
        over the parameters the rule gives it (none for a node without any)."""
        order = self.topology().order
        for node in order:
            node.check_finite, node.max_grad_norm = self.check_finite, self.max_grad_norm
            node.step_in_backward = self.step_in_backward
        self.rule.attach(self)
        for node in order:
            params = self.rule.node_parameters(node)
            node.optimizer = self.optimizer_factory(params) if params else None
            if self.step_in_backward and node.optimizer is not None:
                optim.check_per_parameter(node.optimizer, node.name)
        self.built = True
        self._check_backend_dtypes()

    def _check_backend_dtypes(self) -> None:
        """Fused nodes' parameters must be of a dtype their backend runs: TypeError naming
        the node, its dtype and the backends that run it, instead of the kernel's own
        error at the first step. A backend that is absent is left to the step to report."""
        for node in self.topology().order:
            if not node.fused:
                continue
            try:
                backend = backends.resolve(self.backend_request, node.weight.device)
            except backends.BackendUnavailable:
                return
            err = fused_update.dtype_error(backend, node.weight.dtype)
            if err is not None:
                raise TypeError(f"node {node.name}: {err}")

    @staticmethod
    def _check_placement(node, what: str, t: torch.Tensor) -> None:
        """``t`` must be on the device of the node's parameters and, if float (integer
        token ids are not), of their dtype."""
        like = next(node.parameters(), None)
        if like is None:
            return
        if t.device != like.device:
            raise ValueError(f"node {node.name}: {what} is on {t.device}, the node's parameters on {like.device}")
        if t.is_floating_point() and t.dtype != like.dtype:
            raise TypeError(f"node {node.name}: {what} is {t.dtype}, the node's parameters are {like.dtype}")

    # ---- running ----------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True) -> Network:
        """nn.Module._apply (what ``to``, ``double``, ``cuda`` ... run), then every optimizer
        follows its parameters (see :func:`localprop.optim.follow_parameters`): the network
        owns its optimizers, so moving it moves their state too."""
        before = [p for _, p in self.named_parameters(remove_duplicate=False)]
        super()._apply(fn, recurse)
        after = [p for _, p in self.named_parameters(remove_duplicate=False)]
        replaced = {id(old): new for old, new in zip(before, after) if old is not new}
        if self.built:
            for optimizer in self.optimizers():
                optim.follow_parameters(optimizer, replaced)
            self._check_backend_dtypes()
        return self

    #: the user's own modules the nodes were cut from (localize's model): not submodules
    #: (their parameters are the nodes'), so nn.Module.train alone would leave their own
    #: ``training`` flags, and those of containers outside the nodes, as they were
    _user_modules: tuple[nn.Module, ...] = ()

    def train(self, mode: bool = True) -> Network:
        """nn.Module.train on the network, and on the user's modules it was made from."""
        super().train(mode)
        for module in self._user_modules:
            module.train(mode)
        return self

    def _set_backend(self, device: torch.device) -> None:
        if device not in self._backend_for:  # resolved once per device: it queries the dispatcher
            self._backend_for[device] = backends.resolve(self.backend_request, device)
        for node in self.topology().order:
            node.backend = self._backend_for[device]

    @property
    def backend(self) -> str:
        """The backend the fused ops run on for this network's parameters."""
        return backends.resolve(self.backend_request, next(self.parameters()).device)

    def _step(self, x, y, device: torch.device) -> rules.StepResult:
        """One validated training step by the rule; counts it."""
        self._set_backend(device)
        result = self.rule.train_step(self, x, y, self.steps)
        self.steps += 1
        return result

    # ---- state ------------------------------------------------------------------------
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer of the network: the nodes' in order, then the rule's own."""
        return [n.optimizer for n in self.topology().order if n.optimizer is not None] + self.rule.optimizers(self)

    def get_extra_state(self) -> dict[str, Any]:
        """The step count, every optimizer's state, and what they belong to: the rule's
        identity and the optimizers' classes, so that a load can refuse another's state."""
        return {"steps": self.steps, "optimizers": [o.state_dict() for o in self.optimizers()],
                "rule": _rule_identity(self.rule), "optimizer_classes": [_class_name(o) for o in self.optimizers()]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._check_same_training(state)
        for opt, saved in zip(self.optimizers(), state["optimizers"]):
            opt.load_state_dict(saved)
        self.steps = state["steps"]

    def _check_same_training(self, state: dict[str, Any]) -> None:
        """Refuse the extra state of another rule or other optimizers (torch's optimizers
        load each other's state silently and fail steps later). States written before
        the identities were recorded are checked by their optimizer count only."""
        mine = self.optimizers()
        other_rule = _rule_difference(state.get("rule"), _rule_identity(self.rule))
        if len(state["optimizers"]) != len(mine):
            raise ValueError(f"the state has {len(state['optimizers'])} optimizers, this network {len(mine)}: "
                             + (other_rule or "was it saved from a network of the same nodes and rule?"))
        if other_rule:
            raise ValueError(other_rule)
        for owner, saved, opt in zip(self._optimizer_owners(), state.get("optimizer_classes", []), mine):
            if saved != _class_name(opt):
                raise ValueError(f"{owner}: the checkpoint was written with optimizer {saved}, "
                                 f"this network uses {_class_name(opt)}")
        # before torch's own check, which names neither the node nor the cause
        for owner, saved, opt in zip(self._optimizer_owners(), state["optimizers"], mine):
            counts = [len(g["params"]) for g in saved["param_groups"]], [len(g["params"]) for g in opt.param_groups]
            if counts[0] != counts[1]:
                raise ValueError(f"{owner}: the checkpoint's optimizer steps {counts[0]} parameters (per group), "
                                 f"this network's {counts[1]}: the node or its head is built otherwise here "
                                 f"(a head of another kind? build it as it was saved, e.g. with heads=)")

    def _optimizer_owners(self) -> list[str]:
        """Who each optimizer of :meth:`optimizers` steps, for errors."""
        nodes = [f"node {n.name!r}" for n in self.topology().order if n.optimizer is not None]
        return nodes + [f"the rule's optimizer {k}" for k in range(len(self.rule.optimizers(self)))]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a :meth:`state_dict`, all or nothing: when it raises (another shape,
        rule or optimizer class, a missing key), nothing of the network has changed."""
        if not self.built:
            raise RuntimeError("build the network before loading a state into it (net.build(example) "
                               "or one train_step), so that its heads and optimizers exist")
        # nn.Module's load copies tensor by tensor and reports errors at the end (and this
        # root's extra state, the steps and optimizers, goes first), so a failure is only
        # known after changes. Loading into a deep copy first makes the check the assignment
        # itself, so the two cannot drift; a snapshot-and-restore would have to undo through
        # the same partial path, and assign=True replaces the Parameters the optimizers hold.
        # The price: for a moment the copy doubles the memory of the parameters, buffers and
        # optimizer state (on their device). Only what the copy cannot meet, such as running
        # out of memory in the second load, could still leave the network half-loaded.
        nn.Module.load_state_dict(copy.deepcopy(self), state_dict, strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _rule_identity(rule: rules.Rule) -> dict[str, str]:
    """What a checkpoint records of the rule that trained it: its name and class, with
    those of the local rule a schedule wraps (PGL's ``local``), e.g. "pgl(greedy)"."""
    local = getattr(rule, "local", None)
    if not isinstance(local, rules.Rule):
        return {"name": rule.name, "class": _class_name(rule)}
    inner = _rule_identity(local)
    return {"name": f"{rule.name}({inner['name']})", "class": f"{_class_name(rule)}({inner['class']})"}


def _rule_difference(saved: dict[str, str] | None, mine: dict[str, str]) -> str | None:
    """Why a state of rule ``saved`` (None: not recorded) cannot load into a network of rule
    ``mine``, or None. Classes are named only when the names agree."""
    if saved is None or saved == mine:
        return None
    show = (lambda r: repr(r["name"])) if saved["name"] != mine["name"] else \
        (lambda r: f"{r['name']!r} ({r['class']})")
    return f"the checkpoint was written by rule {show(saved)}, this network trains with rule {show(mine)}"


def _class_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"
