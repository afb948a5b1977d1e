"""Nodes: the units of local learning.

A node k has a transform f_k (its parameters θ_k), maybe an auxiliary head a_k (φ_k),
and its own optimizer over θ_k and φ_k. Two kinds:

- :class:`ModuleNode` wraps any ``nn.Module`` block and learns through autograd inside
  the block (the "local-BP" setting);
- :class:`LocalLinear` is a fused linear node: under local rules it learns with the
  fused ops (transform, head-and-error, update) and builds no autograd graph at all
  (the "BP-free" setting).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .errors import check_finite, check_parameters
from .ops import activation as act


class Node(nn.Module):
    """Base of every node. The engine sets ``name``, ``head``, ``optimizer`` and
    ``backend`` when it builds the network; rules then call :meth:`forward`,
    :meth:`learn` and, on fused nodes, the fused steps."""

    fused = False  #: True when the node can learn without autograd (fused ops)

    def __init__(self) -> None:
        super().__init__()
        self.name = "?"
        self.head: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.backend = "reference"
        self.check_finite = True
        self.input_shape: tuple[int, ...] | None = None   #: per-sample shape it expects
        self.output_shape: tuple[int, ...] | None = None  #: per-sample shape it returns

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of this node's head, or ``h`` itself for a node without head (the last)."""
        return h if self.head is None else self.head(h)

    def learn(self, loss: torch.Tensor, step: int) -> None:
        """Backward of a local loss restricted to this node, one optimizer step, and
        gradients freed at once. Raises FloatingPointError before any change if the
        loss is not finite, and after the step if it made a parameter non-finite."""
        if self.check_finite:
            check_finite(loss, self.name, step, "loss")
        loss.backward()
        self.step_optimizer(step)

    def step_optimizer(self, step: int) -> None:
        """One step of the node's optimizer on the gradients in ``.grad``, which are then
        freed; FloatingPointError if it made a parameter non-finite (see :meth:`check_update`)."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.check_update(self.optimized_parameters(), step)

    def optimized_parameters(self) -> list[nn.Parameter]:
        """The parameters the node's optimizer steps (see Rule.node_parameters)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def check_update(self, params: Iterable[torch.Tensor], step: int, owner: nn.Module | None = None) -> None:
        """With ``check_finite`` on, raise FloatingPointError if the update of ``step`` just
        made one of ``params`` (this node's, its head's, or a rule's module that belongs to
        this node, named by ``owner``, default this node) non-finite. The update is not
        rolled back: see :func:`localprop.errors.check_parameters`."""
        if self.check_finite:
            check_parameters(list(params), self if owner is None else owner, self.name, step)


class ModuleNode(Node):
    """A node around a user's block (trained in place: ``node.block`` is the user's module)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.block(u)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class LocalLinear(Node):
    """A fused linear node: h = σ(u Wᵀ + b).

    Args:
        in_features: K, size of each input sample.
        out_features: N, size of each output sample.
        activation: "relu" (default), "tanh", "gelu", "sigmoid" or None.
        bias: learn an additive bias b (default True).

    Shapes: input [B, K] float32 or float64; output [B, N] of the same dtype.
    Parameters are initialised as ``nn.Linear``'s.
    """

    fused = True

    def __init__(self, in_features: int, out_features: int, activation: str | None = "relu",
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        act.code(activation)  # validates the name
        if in_features < 1 or out_features < 1:
            raise ValueError(f"LocalLinear needs positive sizes, got in_features={in_features}, "
                             f"out_features={out_features}")
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.input_shape, self.output_shape = (in_features,), (out_features,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """σ(u Wᵀ + b). With autograd recording (rule bp, or a user's loop) this is plain
        PyTorch; otherwise (inference) it runs the fused transform on the node's backend."""
        if torch.is_grad_enabled() and (u.requires_grad or self.weight.requires_grad):
            return act.apply(F.linear(u, self.weight, self.bias), self.activation)
        return self.transform(u)[0]

    def transform(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused transform: (h [B, N], aux), see :func:`localprop.ops.transform_ref`."""
        return ops.transform(u, self.weight, self.bias, self.activation, self.backend)

    def head_params(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(A, c) of a linear head, (None, None) without one. Fused nodes need a linear head."""
        if self.head is None:
            return None, None
        if not isinstance(self.head, nn.Linear):
            raise TypeError(f"node {self.name}: fused nodes need an nn.Linear head, got {type(self.head).__name__}")
        return self.head.weight, self.head.bias

    def fused_ce_step(self, u: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One BP-free greedy step: transform, head cross-entropy and error, then the
        update of W, b and of the head (A, c), with no autograd graph.

        u: [B, K]; y: int64 [B]. Returns (h [B, N], loss []). Raises FloatingPointError
        before any parameter changes if the loss is not finite, and after the update if it
        made a parameter non-finite.
        """
        with torch.no_grad():
            h, aux = self.transform(u)
            a, c = self.head_params()
            out = ops.head_error(h, aux, a, c, y, self.activation, backend=self.backend)
            if self.check_finite:
                check_finite(out.loss, self.name, step, "loss")
            grads = [ops.LinearGrad(self.weight, self.bias, out.err, u)]
            if a is not None:
                grads.append(ops.LinearGrad(a, c, out.dlogits, h))
            self.update(grads, step)
        return h, out.loss

    def learn_from_output_grad(self, u: torch.Tensor, h: torch.Tensor, aux: torch.Tensor,
                               g: torch.Tensor, step: int) -> None:
        """BP-free update of W, b from a goal error g = ∂L/∂h given by the rule (e.g. from
        an autograd head or critic run on a detached h): ε = g ⊙ σ'(z), then the fused
        update with dW = εᵀ u. Anything else the rule trains (heads, critics) it steps
        itself.

        u: [B, K] the node's input; h, aux: from :meth:`transform`; g: [B, N], overwritten.
        Raises FloatingPointError before any change if g is not finite, and after the
        update if it made W or b non-finite.
        """
        if self.check_finite:
            check_finite(g, self.name, step, "output gradient")
        self.apply_error(u, self.error(g, h, aux), step)

    def error(self, g: torch.Tensor, h: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """The nonlinear error ε = g ⊙ σ'(z) [B, N] from the goal error g [B, N] (overwritten)
        and what :meth:`transform` returned."""
        with torch.no_grad():
            return act.times_grad(g, h, aux, self.activation)

    def goal_error(self, h: torch.Tensor, aux: torch.Tensor, y: torch.Tensor, message: bool) -> ops.HeadError:
        """Cross-entropy of h itself as logits against labels y [B]: the loss, ∂L/∂h, ε and,
        with ``message``, ε W for the predecessors (all in one fused op)."""
        with torch.no_grad():
            return ops.head_error(h, aux, None, None, y, self.activation,
                                  self.weight if message else None, backend=self.backend)

    def apply_error(self, u: torch.Tensor, err: torch.Tensor, step: int) -> None:
        """Fused update of W, b by the node's optimizer with dW = errᵀ u, db = Σ_b err
        (u [B, K], err [B, N]), checked as :meth:`update` is."""
        self.update([ops.LinearGrad(self.weight, self.bias, err, u)], step)

    def update(self, grads: Sequence[ops.LinearGrad], step: int) -> None:
        """The fused update (:func:`localprop.ops.update`) of the parameters in ``grads``
        (the node's W, b and its head's A, c; several LinearGrads of one parameter add up)
        by the node's optimizer, then :meth:`check_update` of those parameters: the fused
        kernels write them without optimizer.step(), so this is where they are checked."""
        with torch.no_grad():
            ops.update(self.optimizer, list(grads), backend=self.backend)
        updated = {id(t): t for g in grads for t in (g.weight, g.bias) if t is not None}
        self.check_update(updated.values(), step)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, in_features={self.in_features}, out_features={self.out_features}, "
                f"activation={self.activation!r}, bias={self.bias is not None}")


def check_distinct(nodes: Sequence[tuple[str, nn.Module]]) -> None:
    """Each node must own its parameters: a module given as two nodes (or two nodes that
    share a parameter) would have two optimizers stepping one tensor, each on its own
    loss. ``nodes``: (label as the error names the node, the module as the user gave it);
    ValueError naming the two nodes (TypeError for something that is no module)."""
    seen: dict[int, str] = {}
    owner: dict[int, str] = {}
    for label, module in nodes:
        if not isinstance(module, nn.Module):
            raise TypeError(f"node {label} must be an nn.Module (a block or a LocalLinear), "
                            f"got {type(module).__name__}")
        if id(module) in seen:
            raise ValueError(f"node {label} is the same module as node {seen[id(module)]}: give each node its "
                             f"own module (a node's parameters are stepped by its own optimizer)")
        seen[id(module)] = label
        for name, p in module.named_parameters():
            if owner.setdefault(id(p), label) != label:
                raise ValueError(f"nodes {owner[id(p)]} and {label} share the parameter {name!r}: give each node "
                                 f"its own parameters (each is stepped by its own node's optimizer)")
