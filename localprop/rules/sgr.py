"""Successive gradient reconciliation (SGR, after Yang et al., ICML 2024, arXiv 2406.05222).

The paper's exact regulariser could not be read; the formulation here is the library's
own reconstruction (see the class docstring), including its scale convention.
"""
from __future__ import annotations

import torch

from ..errors import check_choice, check_float
from ..nodes import InputGradPenalty
from .base import LocalRule, Messages, NodeStep

DISTANCES = ("l2", "relative", "cosine")
MODES = ("auto", "exact", "finite_difference")


class SGR(LocalRule):
    """Greedy local learning plus a penalty that reconciles each node's input gradient
    with its predecessor's output gradient.

    Node k minimises, over its parameters θ_k and its head's φ_k only,

        L_k + R_k,   L_k = CE(a_k(h_k), y)  (the last node: CE(h_k, y)),
        R_k = lam · mean_b D(G_in(b), G_prev(b)),
        D = ‖G_in − G_prev‖²  ("l2")  or  1 − cos(G_in, G_prev)  ("cosine"), or for "relative"
        R_k = lam · mean_b ‖G_in − G_prev‖² / mean_b ‖G_prev‖²  (scale-free: the batch's mean
            squared norm of G_prev is a constant of the step; normalising each sample by its
            own ‖G_prev(b)‖² instead diverged or stayed below 34% on MNIST-1D's 4-node CNN at
            every lr tried, lam = 0.1: confident samples' vanishing G_prev(b) blows their term up),

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
    - ``"auto"`` (default): finite differences on fused nodes, exact elsewhere. The double
      backward holds a node's graph twice, finite differences one local backward's at a
      time: on a GPT-shaped model at K = 4, 424 against 182 MiB a step (bp: 325), and on
      MNIST-1D's 8-node CNN finite differences were the more accurate (on five seeds, each
      at the lr its sweep chose on validation: 95.0% against 93.6% over lrs 0.01-0.1,
      94.5% against 94.2% with 0.05 added) but not on the 4-node CNN (93.4 against
      93.6%; README, "Accuracy of every rule"), so give
      ``mode="finite_difference"`` where memory counts.

    Args:
        lam: penalty weight λ >= 0 (default 0.01; ``lam=0`` is greedy). Chosen on validation
            by bench/rules/converge.py on MNIST-1D (1-D CNN and MLP at 4, 8 and 16 nodes, 3
            seeds, lr swept per setting, the lr divided by 10 at the first plateau): mean best
            validation accuracy 79.5% at 0.01, 79.0% at 0.03, 78.6% at 0.1; at a constant lr
            and 4 and 8 nodes, 78.2% at 0.01, 76.7% at 0.1, 66.3% at 1 (the former default,
            chosen on digits; at 1 the 4-node CNN ended at 52%). The scale-free "relative"
            form did worse at both lam = 0.1 and 1 (65.9%, 52.0%), and so did "cosine"
            (below l2 at every setting; on the 8-node MLP it diverged at every lr: its
            gradient grows as the input gradient shrinks).
        distance: "l2" (default), "relative" or "cosine".
        mode: "auto" (default), "exact" or "finite_difference".
        eps: relative finite-difference step, > 0 (default 1e-2: in float32 the rounding
            error of the difference stays ~1e-5 relative while ReLU kinks crossed by the
            step smooth the estimate only slightly; use ~1e-6 in float64).

    StepResult.extra["discord"]: node name -> mean_b ‖G_in(b) − G_prev(b)‖ before the update.
    """

    name = "sgr"
    messages = Messages(forward=True)  # G_out, shaped like h
    uses_heads = True
    figures = ("discord",)

    def __init__(self, lam: float = 0.01, distance: str = "l2", mode: str = "auto", eps: float = 1e-2) -> None:
        self.lam = check_float("SGR", "lam", lam, 0)
        self.distance = check_choice("SGR", "distance", distance, DISTANCES)
        self.mode = check_choice("SGR", "mode", mode, MODES)
        self.eps = check_float("SGR", "eps", eps, 0, open_low=True)

    def node_step(self, net, k: int, u: torch.Tensor, y: torch.Tensor, message: torch.Tensor | None,
                  step: int) -> NodeStep:
        """Node k's step on input u [B, ...] (detached) with node k-1's message G_prev
        (shaped like u; None for node 0): h_k, L_k, the message G_out for node k+1 (None
        for the last node) and the discord figure. The penalty's gradient is the node's
        :class:`~localprop.nodes.InputGradPenalty` (exact or by finite differences)."""
        last, B = k == len(net.nodes) - 1, len(y)
        penalty = None if message is None else InputGradPenalty(
            lambda g: self.penalty(B * g, message), lambda g: self.direction(B * g, message), self.mode, self.eps)
        r = net.nodes[k].local_step(u, step, labels=y, input_grad=message is not None, output_grad=not last,
                                    penalty=penalty, autograd=self.mode == "exact")
        return NodeStep(r.h, r.loss, None if last else B * r.output_grad,
                        figures=None if message is None else {"discord": _discord(B * r.input_grad, message)})

    # ---- the penalty --------------------------------------------------------------
    def penalty(self, g_in: torch.Tensor, g_prev: torch.Tensor) -> torch.Tensor:
        """R = lam · mean_b D(G_in(b), G_prev(b)); differentiable in g_in. Shapes [B, ...]."""
        a, c = g_in.flatten(1), g_prev.flatten(1)
        if self.distance == "l2":
            return self.lam * (a - c).pow(2).sum(1).mean()
        if self.distance == "relative":
            return self.lam * (a - c).pow(2).sum(1).mean() / _mean_square(c)
        return self.lam * (1 - _cos(a, c)).mean()

    def direction(self, g_in: torch.Tensor, g_prev: torch.Tensor) -> torch.Tensor:
        """v = B · ∂R/∂G_in in closed form, shaped like g_in (the finite-difference direction)."""
        a, c = g_in.flatten(1), g_prev.flatten(1)
        if self.distance == "l2":
            return (2 * self.lam * (a - c)).view_as(g_in)
        if self.distance == "relative":
            return (2 * self.lam * (a - c) / _mean_square(c)).view_as(g_in)
        na, nc = _norm(a), _norm(c)
        v = -self.lam * (c / (na * nc) - _cos(a, c)[:, None] * a / (na * na))
        return v.view_as(g_in)

    def __repr__(self) -> str:
        return f"SGR(lam={self.lam}, distance={self.distance!r}, mode={self.mode!r}, eps={self.eps})"


def _norm(a: torch.Tensor) -> torch.Tensor:
    """Row norms [B, 1], kept away from 0 so that a zero gradient has cosine 0."""
    return a.norm(dim=1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny ** 0.5)


def _mean_square(c: torch.Tensor) -> torch.Tensor:
    """mean_b ‖c(b)‖² of [B, D], kept away from 0 (a zero G_prev gives no penalty)."""
    return c.pow(2).sum(1).mean().clamp_min(torch.finfo(c.dtype).tiny ** 0.5)


def _cos(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity [B] of [B, D] tensors."""
    return (a * c).sum(1) / (_norm(a) * _norm(c)).squeeze(1)


def _discord(g_in: torch.Tensor, g_prev: torch.Tensor) -> torch.Tensor:
    """mean_b ‖G_in(b) − G_prev(b)‖, a figure of the step (0-dim tensor, no sync)."""
    return (g_in - g_prev).flatten(1).norm(dim=1).mean()
