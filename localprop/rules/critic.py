"""Local critic training with cascaded critics (after Lee, Hsieh & Lee, arXiv 1805.01128
and 2102.01963)."""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import check_callable, check_float, check_int
from ..heads import MeanOverPositions
from .base import LocalRule, Messages, NodeStep

CriticFactory = Callable[[tuple[int, ...], int], nn.Module]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

#: the critics' optimizer when none is given: the paper's Adam, at lr 1e-3 rather than its
#: 1e-4 (meant for 80k iterations; over a few thousand steps 1e-4 barely moves a critic)
DEFAULT_CRITIC_OPTIMIZER: OptimizerFactory = functools.partial(torch.optim.Adam, lr=1e-3)


def default_critic(shape: tuple[int, ...], num_classes: int, hidden: int = 64, per_position: bool = False,
                   tokens: bool = False, pooled: int | None = None, separable: bool = True) -> nn.Module:
    """The default critic for per-sample features of ``shape``, predicting ``num_classes``
    values (the size of the network's output), after the paper's LC_block (one conv layer
    of 128 filters + ReLU, then a dense output layer), behind a parameter-free
    normalisation of the features:

    - [C]: LayerNorm(C), Linear(C, hidden), ReLU, Linear(hidden, classes);
    - [C, H, W]: GroupNorm(1, C), a depthwise-separable convolution (Conv2d(C, C, 3,
      padding 1, groups C), then Conv2d(C, C, 1)), ReLU, AdaptiveAvgPool2d(2), flatten,
      Linear(4C, classes) (C filters rather than the paper's 128);
    - [C, L]: the same with Conv1d and AdaptiveAvgPool1d(2), Linear(2C, classes);
    - other shapes: flatten, then the [C] critic;
    - token features [T, D] (``tokens``, or ``per_position`` outputs): the [C] critic on
      each position, after a mean over positions for per-sample outputs.

    Why the normalisation: a critic moves slowly (Adam, lr 1e-4) and is not trained by
    the node's loss, so without it a node lowers its critic's CE by inflating the scale
    of its output, which grows without bound and derails the next node (measured on the
    digits MLP: output norms 10^4 after 10 epochs, last node at 67%). The paper's blocks
    had batch normalisation for that. hidden = 64 keeps a critic on a 256-wide MLP layer
    at a quarter of that layer's FLOPs, so that progressive inference saves compute.

    Why separable (``separable=False``: one full Conv(C, C, 3), the paper's layer, at about
    the cost of a conv layer of the block it reads): a critic's FLOPs are paid again at
    every exit it offers, and the separable one costs 1/3 + 1/C of the full one (3x3: 1/9
    + 1/C) while still passing the node a gradient at every position of its map, which
    narrower or pooled critics do not (below). Measured on MNIST-1D's 1-D CNN (16 channels,
    3 seeds, bench/rules/converge.py, lr chosen on validation; test accuracy of the full
    model): full critics 89.1 ± 5.1 / 93.6 ± 1.1 / 87.9 ± 3.8% at 4 / 8 / 16 nodes,
    separable 90.1 ± 0.7 / 93.0 ± 0.6 / 91.0 ± 0.9%; with exits at 8 nodes
    (bench/rules/progressive.py, thresholds per node chosen on validation) full critics
    92.0% at 0.49 of the FLOPs, separable 92.7% at 0.29. Other critics tried in that
    training loop (8 nodes, lr 0.03, seeds 0-2, exits as above): Conv(C, C, 1) 92.4%, 91.6%
    with exits at 0.35; Conv(C, C/2, 3) 91.9%, 90.6% at 0.43; Conv(C, C/4, 3) collapsed on
    every seed (27.6-74.9%): a node learns through its critic, and a narrow one passes it a
    gradient of rank C/4.

    ``pooled=P``: the convolution runs on a P (x P) average-pooled map instead of at the
    features' resolution, for cheaper exits (``Critic(critic=functools.partial(default_critic,
    pooled=4))``). Not the default, as measured by bench/rules/progressive.py on MNIST-1D's
    1-D CNN with the full-convolution critics (3 seeds, features 40 long, a constant lr;
    bench/results/progressive.md): at 8 nodes pooled=4 spends 0.21 of the FLOPs with exits
    against 0.52, but the trained network is worse, 85.5% against 89.8% (pooled=8: 84.9%):
    a node learns through its critic, and a pooled critic passes it a coarser gradient. At
    4 nodes pooled=8 was the steadier (89.4 ± 1.5% against 82.5 ± 11.8%, one full-resolution
    seed ending at 66%). In the loop above (8 nodes, lr 0.03, with its lr drop) pooled=8
    gave 74.4 / 92.4 / 86.9% on seeds 0-2.
    """
    c = shape[0]
    if (per_position or tokens) and len(shape) == 2:
        pool = [] if per_position else [MeanOverPositions()]
        return nn.Sequential(*pool, *_mlp_critic(shape[1], num_classes, hidden))
    if len(shape) in (2, 3):
        conv, pool = (nn.Conv1d, nn.AdaptiveAvgPool1d) if len(shape) == 2 else (nn.Conv2d, nn.AdaptiveAvgPool2d)
        first = [] if pooled is None else [pool(pooled)]
        mix = [conv(c, c, 3, padding=1, groups=c), conv(c, c, 1)] if separable else [conv(c, c, 3, padding=1)]
        return nn.Sequential(nn.GroupNorm(1, c, affine=False), *first, *mix, nn.ReLU(), pool(2), nn.Flatten(),
                             nn.Linear(2 ** (len(shape) - 1) * c, num_classes))
    return nn.Sequential(nn.Flatten(), *_mlp_critic(math.prod(shape), num_classes, hidden))


def _mlp_critic(features: int, size: int, hidden: int) -> list[nn.Module]:
    """The layers [..., features] -> [..., size]: LayerNorm (no affine), Linear, ReLU, Linear
    (flat in the critic's Sequential: its state_dict keys are those of earlier versions)."""
    return [nn.LayerNorm(features, elementwise_affine=False), nn.Linear(features, hidden), nn.ReLU(),
            nn.Linear(hidden, size)]


class Critic(LocalRule):
    """Local critic training: node k < K has a critic c_k (its head) that approximates the
    network's output from h_k.

    - Node k is updated with L_k = mean_b CE(c_k(h_k(b)), y(b)) back-propagated through
      c_k into the node; c_k is not stepped by it (its parameters are excluded from the
      node's optimizer). The last node K learns from its own output: L_K = CE(h_K, y).
    - Critics learn in cascade: loss_c_k = mean_b |ℓ_k(b) − sg(ℓ_{k+1}(b))| + critic_ce · mean_b
      ℓ_k(b), ℓ the per-sample loss (CE; ℓ_K of the final output), with their own optimizer,
      every ``critic_every`` steps. The CE term is the library's own (the paper's cascade
      is critic_ce = 0): the gap alone has a fixed point where every critic predicts one
      class, since matching the next node's loss does not need the labels; measured on
      MNIST-1D's CNN, 4 nodes, 80 epochs, the gap alone ended at 10.8% (critics at lr 1e-3)
      and 66.8% (1e-4), gap + CE at 90.9% (bp 91.1%).

    Message: node k+1's B per-sample losses ℓ_{k+1}, travelling backward one node. They
    do not lag: node k+1's step has h_k (its input) and its own ℓ_{k+1} on the same batch,
    so it steps critic c_k right there, before node k+2 runs (no activation is kept
    for later). On fused nodes the critic runs with autograd on a detached h_k, and the
    node learns BP-free from g = ∂L_k/∂h_k.

    Args:
        critic: ``(per-sample shape, num_classes) -> nn.Module`` building each critic
            (default :func:`default_critic`).
        critic_every: train the critics on every n-th step (>= 1; default 1, the paper's best).
        critic_optimizer: factory ``params -> Optimizer`` for each critic (default Adam lr 1e-3).
        critic_ce: weight >= 0 of the cross-entropy term in each critic's loss (default 1.0;
            0 is the paper's cascade). 3.0 was measured against it (bench/rules/converge.py,
            MNIST-1D, 3 seeds, lr swept, a constant lr): higher on the MLP at 4 / 8 / 16
            nodes (67.0 / 64.4 / 64.2% against 64.5 / 63.3 / 62.2) and the 8-node CNN (89.1
            against 85.2), but one seed of three fell to 43% and 53% on the 4- and 16-node
            CNNs; mean validation accuracy over the six settings 73.7% against 75.1%, so 1.0
            stays. What the weight does: the gap's gradient is sign(ℓ_k − ℓ_{k+1}) ∇ℓ_k, so
            at critic_ce = 1 a critic learns from twice the CE gradient on the samples where
            the next node's loss is lower than its own and from none on the others; above 1
            it learns from every sample.

    StepResult.extra["critic_gap"]: node name -> loss_c_k before its update, on steps that
    train critics.
    """

    name = "critic"
    messages = Messages(backward=True)  # the per-sample losses ℓ_k [B]
    uses_heads = True
    own_heads = "its critics (choose them with Critic(critic=...))"
    figures = ("critic_gap",)

    def __init__(self, critic: CriticFactory | None = None, critic_every: int = 1,
                 critic_optimizer: OptimizerFactory | None = None, critic_ce: float = 1.0) -> None:
        self.critic_ce = check_float("Critic", "critic_ce", critic_ce, 0)
        self.make_critic = check_callable("Critic", "critic", critic, "(shape, num_classes) -> nn.Module") \
            or default_critic
        self.critic_every = check_int("Critic", "critic_every", critic_every, 1)
        self.critic_optimizer = check_callable("Critic", "critic_optimizer", critic_optimizer,
                                               "params -> Optimizer") or DEFAULT_CRITIC_OPTIMIZER

    def attach(self, net) -> None:
        """Replace each head by a critic; critics live on the nodes (node.head), their
        optimizers in ``net.rule_state.optimizers``."""
        out = net.output_spec
        for node in net.nodes[:-1]:
            like = next(node.parameters())
            if self.make_critic is default_critic:
                critic = default_critic(node.output_shape, out[-1], per_position=len(out) > 1,
                                        tokens=net.token_features)
            else:
                critic = self.make_critic(node.output_shape, out[-1])
            node.head = critic.to(like.device, like.dtype)
        net.rule_state = nn.ModuleDict()
        net.rule_state.optimizers = [self.critic_optimizer(node.head.parameters()) for node in net.nodes[:-1]]

    def node_parameters(self, node) -> list[nn.Parameter]:
        critic = set() if node.head is None else {id(p) for p in node.head.parameters()}
        return [p for p in node.parameters() if id(p) not in critic]

    def train_critic(self, net, k: int, h: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
                     step: int) -> torch.Tensor | None:
        """Train critic k on node k's output h [B, ...] of ``step`` against node k+1's
        per-sample losses ``target`` [B] of the same step (the backward message), if
        ``step`` trains critics; returns the loss before the update (0-dim) or None."""
        if step % self.critic_every:
            return None
        node = net.nodes[k]
        gap = _train_critic(node.head, net.rule_state.optimizers[k], h, y, target, node.objective, self.critic_ce)
        node.check_update(node.head.parameters(), step)
        return gap

    def node_step(self, net, k: int, u: torch.Tensor, y: torch.Tensor, message, step: int) -> NodeStep:
        """Update node k on input u [B, ...] (detached) from its critic's loss (the last node:
        from its own cross-entropy); returns h_k, L_k and, from node 1 on, the per-sample ℓ_k
        [B] (detached) as the backward message for critic k-1."""
        node = net.nodes[k]
        if node.head is None:
            r = node.local_step(u, step, labels=y, per_sample=True)
        else:  # the critic passes the gradient on but is not trained by it
            r = node.local_step(u, step, loss=lambda h, critic: node.objective.per_sample(critic(h), y),
                                train_head=False)
        return NodeStep(r.h, r.per_sample.mean(), backward=r.per_sample if k > 0 else None)

    def absorb(self, net, k, h, y, back, step):
        """Critic k learns from node k+1's per-sample losses (see :meth:`train_critic`)."""
        gap = self.train_critic(net, k, h, y, back, step)
        return None if gap is None else {"critic_gap": gap}

    def __repr__(self) -> str:
        return f"Critic(critic_every={self.critic_every}, critic_ce={self.critic_ce})"


def _train_critic(critic: nn.Module, optimizer, h: torch.Tensor, y: torch.Tensor,
                  target: torch.Tensor, objective, ce: float) -> torch.Tensor:
    """One step of loss_c = mean_b |ℓ(critic(h), y)(b) − target(b)| + ce · mean_b ℓ(b), ℓ the
    per-sample loss of the network's objective; returns the gap term before the update."""
    losses = objective.per_sample(critic(h), y)
    gap = (losses - target).abs().mean()
    optimizer.zero_grad(set_to_none=True)
    (gap + ce * losses.mean() if ce else gap).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return gap.detach()
