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

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import objectives, ops, optim
from .errors import check_finite, check_parameters
from .ops import activation as act


#: a local loss computed from the node's output: ``loss(h, head) -> loss [] or per-sample [B]``,
#: where ``head(h)`` gives the logits of the node's head (``h`` itself without one)
LossFn = Callable[[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


@dataclass(slots=True)
class LocalStep:
    """What one local step of a node returns (every tensor detached)."""
    h: torch.Tensor                               #: the node's output [B, ...]
    loss: torch.Tensor | None                     #: [] the local loss (None when learning from a given grad)
    input_grad: torch.Tensor | None = None        #: ∂loss/∂u [B, ...], on request
    output_grad: torch.Tensor | None = None       #: ∂loss/∂h [B, ...], on request
    per_sample: torch.Tensor | None = None        #: [B] per-sample losses (loss is their mean), on request


@dataclass(frozen=True, slots=True)
class InputGradPenalty:
    """A penalty R(g) on g = ∂L/∂u, the input gradient of the node's head cross-entropy L,
    added to the node's objective L + R (SGR's reconciliation).

    - ``penalty(g) -> R []``, differentiable in g: the "exact" method, a double backward
      (``create_graph=True``) through the node and its head, on the node's autograd path;
    - ``direction(g) -> v = ∂R/∂g`` (detached, shaped like u): the "finite_difference"
      method, ∇_θ R = ∇_θ ⟨∂L/∂u, v⟩ ≈ [∇_θ L(u + δv) − ∇_θ L(u − δv)] / (2δ) with
      δ = eps · ‖u‖ / ‖v‖ (norms over the batch: a relative step), two extra passes
      (BP-free on fused nodes: fused passes stacked into one fused update);
    - method "auto": finite differences on fused nodes, exact on autograd ones.
    """
    penalty: Callable[[torch.Tensor], torch.Tensor]
    direction: Callable[[torch.Tensor], torch.Tensor]
    method: str = "auto"   #: "exact", "finite_difference" or "auto"
    eps: float = 1e-2


class Node(nn.Module):
    """Base of every node. The engine sets ``name``, ``head``, ``optimizer`` and
    ``backend`` when it builds the network; rules then call :meth:`local_step` (and
    :meth:`forward`).

    One protocol on both kinds: :meth:`local_step` takes one local step from the node's
    local objective, through autograd here (any node) or the fused ops (LocalLinear)."""

    fused = False  #: True when the node can learn without autograd (fused ops)

    def __init__(self) -> None:
        super().__init__()
        self.name = "?"
        self.head: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.backend = "reference"
        self.check_finite = True
        #: clip the gradient of each step (the node's and its head's parameters together) to
        #: this norm, as torch.nn.utils.clip_grad_norm_ does; None: no clipping
        self.max_grad_norm: float | None = None
        #: each parameter steps as its gradient arrives in the node's backward (see
        #: localprop.optim.stepping_in_backward), never holding all gradients at once
        self.step_in_backward = False
        #: what ``labels=`` targets are scored with (the network's objective, set when it builds)
        self.objective: objectives.Objective = objectives.CrossEntropy()
        self.input_shape: tuple[int, ...] | None = None   #: per-sample shape it expects
        self.output_shape: tuple[int, ...] | None = None  #: per-sample shape it returns

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of this node's head, or ``h`` itself for a node without head (the last)."""
        return h if self.head is None else self.head(h)

    def local_step(self, u: torch.Tensor, step: int, *, labels: torch.Tensor | None = None,
                   loss: LossFn | None = None, grad: torch.Tensor | None = None, train_head: bool = True,
                   input_grad: bool = False, output_grad: bool = False, per_sample: bool = False,
                   penalty: InputGradPenalty | None = None, autograd: bool = False) -> LocalStep:
        """One local step of the node on input u [B, ...] (a detached leaf) from exactly one
        objective, then the update by the node's optimizer:

        - ``labels`` y: targets of the node's objective (default: class labels [B] or [B, T]
          and cross-entropy), scored on its head's output (on h itself without a head);
        - ``loss``: a loss the rule computes from the node's output, ``loss(h, head)``
          (a scalar, or per-sample losses [B] whose mean is learnt);
        - ``grad``: g = ∂L/∂h [B, ...] given from outside (overwritten on fused nodes).

        ``train_head``: the head's gradient trains it with the node's optimizer (False: the
        head passes the gradient on, untrained, e.g. a critic with its own optimizer).
        ``input_grad``, ``output_grad``, ``per_sample``: also return ∂L/∂u, ∂L/∂h, the
        per-sample losses. ``penalty``: an :class:`InputGradPenalty` added to the labels'
        cross-entropy. ``autograd``: learn through autograd even on a fused node.

        Checked as :meth:`learn` is: FloatingPointError before any change if the loss (or
        the given grad) is not finite, after the update if it made a parameter non-finite.
        This base implementation learns through autograd (any node)."""
        _check_objective(labels, loss, grad, penalty)
        if input_grad or penalty is not None:
            u.requires_grad_()
        exact = penalty is not None and penalty.method != "finite_difference"
        if grad is not None:
            h = self(u)
            if self.check_finite:
                check_finite(grad, self.name, step, "output gradient")
            self._backward_and_step(lambda: h.backward(grad), step)
            return LocalStep(h.detach(), None, u.grad if input_grad else None, grad if output_grad else None)
        with _twice_differentiable() if exact else contextlib.nullcontext():
            h = self(u)
            value, samples = self._loss(h, labels, loss, train_head, per_sample)
        samples = None if samples is None else samples.detach()
        if exact:  # double backward
            wrt = ([h] if output_grad else []) + [u]
            grads = list(torch.autograd.grad(value, wrt, retain_graph=True, create_graph=True))
            g_h = grads.pop(0).detach() if output_grad else None
            g_u = grads.pop(0)
            self.learn(value + penalty.penalty(g_u), step)
            return LocalStep(h.detach(), value.detach(), g_u.detach(), g_h, samples)
        if output_grad:
            h.retain_grad()
        self.learn(value, step, optimizer_step=penalty is None)
        if penalty is not None:  # finite differences: the shifted passes' backward into the same .grad
            v = penalty.direction(u.grad)
            delta = self._step_size(u, v, penalty.eps, step)
            for sign in (() if delta is None else (1.0, -1.0)):
                shifted, _ = self._loss(self(u.detach() + sign * delta * v), labels, None, True, False)
                (shifted * (sign / (2 * delta))).backward()
            self.step_optimizer(step)
        return LocalStep(h.detach(), value.detach(), u.grad if input_grad else None,
                         h.grad if output_grad else None, samples)

    def _loss(self, h: torch.Tensor, labels: torch.Tensor | None, loss: LossFn | None, train_head: bool,
              per_sample: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the loss to learn [], the per-sample losses [B] or None) of the output h."""
        head = self.head_logits if train_head else self._frozen_head_logits
        if labels is not None:
            if per_sample:
                samples = self.objective.per_sample(head(h), labels)
                return samples.mean(), samples
            fused = getattr(self.head, "loss", None) if train_head else None  # a head that takes the loss itself
            return (fused(h, labels, self.objective) if fused else self.objective(head(h), labels)), None
        value = loss(h, head)
        return (value.mean(), value) if value.dim() else (value, None)

    def _frozen_head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The head's logits, its parameters passing the gradient on but not trained by it."""
        with _frozen(self.head):
            return self.head_logits(h)

    def _step_size(self, u: torch.Tensor, v: torch.Tensor, eps: float, step: int) -> float | None:
        """The finite-difference step δ = eps · ‖u‖/‖v‖ (eps/‖v‖ when u = 0), or None when v = 0
        (nothing to add). Norms in float64: a float32 norm of a large v can overflow."""
        if self.check_finite:
            check_finite(v, self.name, step, "penalty direction (input gradient)")
        norm_u, norm_v = float(u.detach().double().norm()), float(v.double().norm())
        return None if norm_v == 0 else eps * (norm_u or 1.0) / norm_v

    def learn(self, loss: torch.Tensor, step: int, optimizer_step: bool = True) -> None:
        """Backward of a local loss restricted to this node, one optimizer step, and
        gradients freed at once (``optimizer_step=False``: the backward only, more passes
        may add to the gradients before :meth:`step_optimizer`). Raises FloatingPointError
        before any change if the loss is not finite, and after the step if it made a
        parameter non-finite."""
        if self.check_finite:
            check_finite(loss, self.name, step, "loss")
        if optimizer_step:
            self._backward_and_step(loss.backward, step)
        else:
            loss.backward()

    def _backward_and_step(self, backward: Callable[[], None], step: int) -> None:
        """``backward()``, then one step of the node's optimizer (:meth:`step_optimizer`);
        with ``step_in_backward``, each parameter steps and frees its gradient during the
        backward, checked as after a step."""
        if not self.step_in_backward:
            backward()
            self.step_optimizer(step)
            return
        with optim.stepping_in_backward(self.optimizer):
            backward()
        self.check_update(self.optimized_parameters(), step)

    def step_optimizer(self, step: int) -> None:
        """One step of the node's optimizer on the gradients in ``.grad``, which are then
        freed; FloatingPointError if it made a parameter non-finite (see :meth:`check_update`).
        With ``max_grad_norm``, the gradients are clipped first (clip_grad_norm_)."""
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.optimized_parameters(), self.max_grad_norm)
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

    def local_step(self, u: torch.Tensor, step: int, *, labels: torch.Tensor | None = None,
                   loss: LossFn | None = None, grad: torch.Tensor | None = None, train_head: bool = True,
                   input_grad: bool = False, output_grad: bool = False, per_sample: bool = False,
                   penalty: InputGradPenalty | None = None, autograd: bool = False) -> LocalStep:
        """:meth:`Node.local_step`, BP-free: the fused transform, head-and-error and update
        ops, no autograd graph through the node (u: [B, K]). A ``loss`` runs with autograd
        on the detached output only, the node then learns from its g = ∂L/∂h, and a linear
        head it reached through ``head`` is stepped by the fused update too. With
        ``autograd`` (or an "exact" penalty) the step takes the node's autograd path."""
        if autograd or (penalty is not None and penalty.method == "exact"):
            return super().local_step(u, step, labels=labels, loss=loss, grad=grad, train_head=train_head,
                                      input_grad=input_grad, output_grad=output_grad, per_sample=per_sample,
                                      penalty=penalty)
        _check_objective(labels, loss, grad, penalty)
        if labels is not None and self._fused_cross_entropy(labels):
            return self._ce_step(u, labels, step, input_grad, output_grad, per_sample, penalty)
        if labels is not None:  # another objective: autograd on the detached output only
            if penalty is not None:
                return super().local_step(u, step, labels=labels, train_head=train_head, input_grad=input_grad,
                                          output_grad=output_grad, per_sample=per_sample, penalty=penalty)
            objective, target = self.objective, labels
            loss = (lambda h, head: objective.per_sample(head(h), target)) if per_sample else \
                (lambda h, head: objective(head(h), target))
            labels = None
        with torch.no_grad():
            h, aux = self.transform(u)
        value = samples = None
        if grad is None:
            hd, logits = h.detach().requires_grad_(), []
            a, c = self.head_params() if train_head else (None, None)
            if not train_head:
                head = self.head_logits
            elif a is None:
                head = _identity
            else:
                def head(x: torch.Tensor) -> torch.Tensor:  # the linear head, its gradient kept for the update
                    logits.append(F.linear(x, a.detach(), None if c is None else c.detach()))
                    return logits[-1]
            value = loss(hd, head)
            if value.dim():
                value, samples = value.mean(), value.detach()
            grads = torch.autograd.grad(value, [hd, *logits])
            grad, value = grads[0], value.detach()
        if self.check_finite:
            check_finite(grad, self.name, step, "output gradient")
        g_h = grad.clone() if output_grad else None  # error() overwrites grad
        err = self.error(grad, h, aux)
        g_u = _matmul(err, self.weight) if input_grad else None
        # one update, so one optimizer.step() for the node and its linear head (dA = dlogitsᵀ h)
        head_grads = [ops.LinearGrad(a, c, d, h) for d in grads[1:]] if value is not None and logits else []
        self.update([ops.LinearGrad(self.weight, self.bias, err, u), *head_grads], step)
        return LocalStep(h, value, g_u, g_h, samples)

    def _ce_step(self, u, y, step, input_grad, output_grad, per_sample, penalty) -> LocalStep:
        """The labels' step: transform, head cross-entropy and error, then one fused update
        of W, b and of the head (A, c), plus an input-gradient penalty's shifted passes."""
        with torch.no_grad():
            out, h, grads = self._ce_pass(u, y, message=input_grad or penalty is not None)
            if self.check_finite:
                check_finite(out.loss, self.name, step, "loss")
            g_h = None
            if output_grad:
                a, _ = self.head_params()
                g_h = out.dlogits if a is None else out.dlogits @ a
            if penalty is not None:  # finite differences, BP-free: the shifted passes join the update
                v = penalty.direction(out.message)
                delta = self._step_size(u, v, penalty.eps, step)
                for sign in (() if delta is None else (1.0, -1.0)):
                    grads += self._ce_pass(u + sign * delta * v, y, scale=sign / (2 * delta))[2]
            samples = F.cross_entropy(self.head_logits(h), y, reduction="none") if per_sample else None
            self.update(grads, step)
        return LocalStep(h, out.loss, out.message if input_grad else None, g_h, samples)

    def _fused_cross_entropy(self, labels: torch.Tensor) -> bool:
        """True if the fused head-and-error op computes this step's loss: the plain
        cross-entropy of per-sample labels [B], none of them ignored."""
        objective = self.objective
        return type(objective) is objectives.CrossEntropy and labels.dim() == 1 \
            and not bool((labels == objective.ignore_index).any())

    def _ce_pass(self, u: torch.Tensor, y: torch.Tensor, message: bool = False, scale: float = 1.0):
        """One fused pass at input u: (HeadError, h, the LinearGrads of ``scale`` · L for the
        node and its head); with ``message``, HeadError.message is ∂L/∂u."""
        h, aux = self.transform(u)
        a, c = self.head_params()
        out = ops.head_error(h, aux, a, c, y, self.activation, self.weight if message else None,
                             backend=self.backend)
        err, dlogits = (out.err, out.dlogits) if scale == 1.0 else (out.err * scale, out.dlogits * scale)
        grads = [ops.LinearGrad(self.weight, self.bias, err, u)]
        if a is not None:
            grads.append(ops.LinearGrad(a, c, dlogits, h))
        return out, h, grads

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
        by the node's optimizer, through its ``step()`` (hooks and schedulers see it), then
        :meth:`check_update` of those parameters."""
        with torch.no_grad():
            ops.update(self.optimizer, list(grads), backend=self.backend, max_norm=self.max_grad_norm)
        updated = {id(t): t for g in grads for t in (g.weight, g.bias) if t is not None}
        self.check_update(updated.values(), step)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, in_features={self.in_features}, out_features={self.out_features}, "
                f"activation={self.activation!r}, bias={self.bias is not None}")


def _check_objective(labels, loss, grad, penalty) -> None:
    if (labels is not None) + (loss is not None) + (grad is not None) != 1:
        raise TypeError("local_step takes exactly one objective: labels=, loss= or grad=")
    if penalty is not None and labels is None:
        raise TypeError("local_step: an input-gradient penalty is added to the labels' cross-entropy only")


def _identity(h: torch.Tensor) -> torch.Tensor:
    return h


def _matmul(err: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return err @ weight


@contextlib.contextmanager
def _twice_differentiable():
    """Inside the block, attention by PyTorch's math kernel and cross-entropy by PyTorch's
    own: the fused attention kernels and the lean cross-entropies have no second
    derivative, which an exact input-gradient penalty takes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]), objectives.twice_differentiable():
        yield


@contextlib.contextmanager
def _frozen(module: nn.Module | None):
    """Parameters of ``module`` do not require grad inside the block (restored after)."""
    params = [] if module is None else [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


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
