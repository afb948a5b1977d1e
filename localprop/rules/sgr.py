"""Successive gradient reconciliation (SGR, after Yang et al., ICML 2024, arXiv 2406.05222).

The paper's exact regulariser could not be read; the formulation here is the library's
own reconstruction (see the class docstring), including its scale convention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..errors import check_choice, check_finite, check_float
from .base import Rule, StepResult

DISTANCES = ("l2", "cosine")
MODES = ("auto", "exact", "finite_difference")


class SGR(Rule):
    """Greedy local learning plus a penalty that reconciles each node's input gradient
    with its predecessor's output gradient.

    Node k minimises, over its parameters θ_k and its head's φ_k only,

        L_k + R_k,   L_k = CE(a_k(h_k), y)  (the last node: CE(h_k, y)),
        R_k = lam · mean_b D(G_in(b), G_prev(b)),
        D = ‖G_in − G_prev‖²  ("l2")  or  1 − cos(G_in, G_prev)  ("cosine"),

    where u = sg(h_{k-1}) is a leaf, G_in = B · ∂L_k/∂u and G_prev = B · ∂L_{k-1}/∂h_{k-1},
    the message node k-1 computed in its own step (detached, activation-sized, travelling
    forward). Scale convention (the library's own): L_k is a batch mean, so B · ∂L_k/∂u(b)
    is the gradient of sample b's own loss; with it, lam does not depend on the batch size.
    Node 0 has no predecessor and no penalty.

    ∇_θ R_k is computed in one of two ways that agree up to finite-difference error:

    - ``"exact"``: double backward (``create_graph=True``) through the node and its head;
      any node (fused LocalLinear nodes take their autograd forward);
    - ``"finite_difference"``: with v = B · ∂R_k/∂G_in (detached; "l2": v = 2·lam·(G_in − G_prev)),
      ∇_θ R_k = ∇_θ ⟨∂L_k/∂u, v⟩ ≈ [∇_θ L_k(u + δv) − ∇_θ L_k(u − δv)] / (2δ),
      δ = eps · ‖u‖ / ‖v‖ (norms over the whole batch: a relative step of size eps), so
      two extra local passes. On fused nodes this is BP-free: each pass is the fused
      transform and head-and-error op, and the three passes' gradients are stacked into
      one fused update (no dW is materialised);
    - ``"auto"`` (default): finite differences on fused nodes, exact elsewhere.

    Args:
        lam: penalty weight λ >= 0 (default 1.0, chosen on digits; ``lam=0`` is greedy).
        distance: "l2" (default) or "cosine".
        mode: "auto" (default), "exact" or "finite_difference".
        eps: relative finite-difference step, > 0 (default 1e-2: in float32 the rounding
            error of the difference stays ~1e-5 relative while ReLU kinks crossed by the
            step smooth the estimate only slightly; use ~1e-6 in float64).

    StepResult.extra["discord"]: node name -> mean_b ‖G_in(b) − G_prev(b)‖ before the update.
    """

    name = "sgr"
    uses_heads = True

    def __init__(self, lam: float = 1.0, distance: str = "l2", mode: str = "auto", eps: float = 1e-2) -> None:
        self.lam = check_float("SGR", "lam", lam, 0)
        self.distance = check_choice("SGR", "distance", distance, DISTANCES)
        self.mode = check_choice("SGR", "mode", mode, MODES)
        self.eps = check_float("SGR", "eps", eps, 0, open_low=True)

    def train_step(self, net, x, y, step):
        losses, discord = {}, {}
        h, g_prev = x, None
        for k, node in enumerate(net.nodes):
            h, losses[node.name], g_prev, d = self.node_step(net, k, h.detach(), y, g_prev, step)
            if d is not None:
                discord[node.name] = d
        return StepResult(step, {n: float(v) for n, v in losses.items()},
                          {"discord": {n: float(v) for n, v in discord.items()}})

    def node_step(self, net, k: int, u: torch.Tensor, y: torch.Tensor, message: torch.Tensor | None,
                  step: int):
        """Node k's step on input u [B, ...] (detached) with node k-1's message G_prev
        (shaped like u; None for node 0). Returns (h_k detached, L_k, the message G_out
        for node k+1 (None for the last node), discord or None)."""
        node, last = net.nodes[k], k == len(net.nodes) - 1
        finite_difference = self.mode == "finite_difference" or (self.mode == "auto" and node.fused)
        if finite_difference and node.fused:
            fn = self._fused_step
        else:
            fn = self._fd_step if finite_difference else self._exact_step
        return fn(node, u, y, message, step, last)

    # ---- the penalty --------------------------------------------------------------
    def penalty(self, g_in: torch.Tensor, g_prev: torch.Tensor) -> torch.Tensor:
        """R = lam · mean_b D(G_in(b), G_prev(b)); differentiable in g_in. Shapes [B, ...]."""
        a, c = g_in.flatten(1), g_prev.flatten(1)
        if self.distance == "l2":
            return self.lam * (a - c).pow(2).sum(1).mean()
        return self.lam * (1 - _cos(a, c)).mean()

    def direction(self, g_in: torch.Tensor, g_prev: torch.Tensor) -> torch.Tensor:
        """v = B · ∂R/∂G_in in closed form, shaped like g_in (the finite-difference direction)."""
        a, c = g_in.flatten(1), g_prev.flatten(1)
        if self.distance == "l2":
            return (2 * self.lam * (a - c)).view_as(g_in)
        na, nc = _norm(a), _norm(c)
        v = -self.lam * (c / (na * nc) - _cos(a, c)[:, None] * a / (na * na))
        return v.view_as(g_in)

    def _step_size(self, node, u: torch.Tensor, v: torch.Tensor, step: int) -> float | None:
        """δ = eps · ‖u‖/‖v‖ (eps/‖v‖ when u = 0), or None when v = 0 (nothing to reconcile).
        Norms in float64: a float32 norm of a large v can overflow."""
        if node.check_finite:
            check_finite(v, node.name, step, "SGR direction (input gradient)")
        norm_u, norm_v = float(u.detach().double().norm()), float(v.double().norm())
        return None if norm_v == 0 else self.eps * (norm_u or 1.0) / norm_v

    # ---- node steps: (h detached, loss, message for node k+1, discord or None) ---------
    def _exact_step(self, node, u, y, g_prev, step, last):
        u.requires_grad_(g_prev is not None)
        h = node(u)
        loss = F.cross_entropy(node.head_logits(h), y)
        wrt = ([] if last else [h]) + ([] if g_prev is None else [u])
        grads = list(torch.autograd.grad(loss, wrt, retain_graph=True, create_graph=g_prev is not None)) if wrt else []
        g_out = None if last else len(y) * grads.pop(0).detach()
        total, discord = loss, None
        if g_prev is not None:
            g_in = len(y) * grads.pop(0)
            discord = _discord(g_in.detach(), g_prev)
            total = loss + self.penalty(g_in, g_prev)
        node.learn(total, step)
        return h.detach(), loss.detach(), g_out, discord

    def _fd_step(self, node, u, y, g_prev, step, last):
        """Finite differences on an autograd node: backward of L_k(u) (which also gives
        ∂L_k/∂u and ∂L_k/∂h_k), then the two shifted passes' backward into the same
        .grad, then one optimizer step."""
        u.requires_grad_(g_prev is not None)
        h = node(u)
        if not last:
            h.retain_grad()
        loss = F.cross_entropy(node.head_logits(h), y)
        if node.check_finite:
            check_finite(loss, node.name, step, "loss")
        loss.backward()
        g_out = None if last else len(y) * h.grad
        discord = None
        if g_prev is not None:
            g_in = len(y) * u.grad
            discord = _discord(g_in, g_prev)
            v = self.direction(g_in, g_prev)
            delta = self._step_size(node, u, v, step)
            for sign in (() if delta is None else (1.0, -1.0)):
                shifted = F.cross_entropy(node.head_logits(node(u.detach() + sign * delta * v)), y)
                (shifted * (sign / (2 * delta))).backward()
        node.step_optimizer(step)
        return h.detach(), loss.detach(), g_out, discord

    def _fused_step(self, node, u, y, g_prev, step, last):
        """Finite differences on a fused node, BP-free: every pass is the fused transform
        and head-and-error op; one fused update takes all the passes' gradients."""
        with torch.no_grad():
            out, h, grads = _fused_pass(node, u, y, message=g_prev is not None)
            if node.check_finite:
                check_finite(out.loss, node.name, step, "loss")
            a, _ = node.head_params()
            g_out = None if last else len(y) * (out.dlogits if a is None else out.dlogits @ a)
            discord = None
            if g_prev is not None:
                g_in = len(y) * out.message
                discord = _discord(g_in, g_prev)
                v = self.direction(g_in, g_prev)
                delta = self._step_size(node, u, v, step)
                for sign in (() if delta is None else (1.0, -1.0)):
                    grads += _fused_pass(node, u + sign * delta * v, y, scale=sign / (2 * delta))[2]
            node.update(grads, step)
        return h, out.loss, g_out, discord

    def __repr__(self) -> str:
        return f"SGR(lam={self.lam}, distance={self.distance!r}, mode={self.mode!r}, eps={self.eps})"


def _fused_pass(node, u, y, message: bool = False, scale: float = 1.0):
    """One fused pass of a LocalLinear node at input u: (HeadError, h, the LinearGrads of
    ``scale`` · L_k for the node and its head)."""
    h, aux = node.transform(u)
    a, c = node.head_params()
    out = ops.head_error(h, aux, a, c, y, node.activation, node.weight if message else None,
                         backend=node.backend)
    err, dlogits = (out.err, out.dlogits) if scale == 1.0 else (out.err * scale, out.dlogits * scale)
    grads = [ops.LinearGrad(node.weight, node.bias, err, u)]
    if a is not None:
        grads.append(ops.LinearGrad(a, c, dlogits, h))
    return out, h, grads


def _norm(a: torch.Tensor) -> torch.Tensor:
    """Row norms [B, 1], kept away from 0 so that a zero gradient has cosine 0."""
    return a.norm(dim=1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny ** 0.5)


def _cos(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity [B] of [B, D] tensors."""
    return (a * c).sum(1) / (_norm(a) * _norm(c)).squeeze(1)


def _discord(g_in: torch.Tensor, g_prev: torch.Tensor) -> torch.Tensor:
    """mean_b ‖G_in(b) − G_prev(b)‖, a figure of the step (0-dim tensor, no sync)."""
    return (g_in - g_prev).flatten(1).norm(dim=1).mean()
