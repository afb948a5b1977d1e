"""Default auxiliary heads, built from a node's per-sample output shape and what the
network's last node outputs (a head predicts the same thing)."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import objectives

#: a user's head builder: (node index, per-sample output shape, output size) -> head
HeadFactory = Callable[[int, tuple, int], nn.Module]

#: the rank of a per-token head's projection when the output is larger (a vocabulary):
#: D -> RANK -> V costs RANK (D + V) parameters instead of D V
RANK = 64
#: the side a feature map is average-pooled to (at most) before a default head's convolution
POOLED = 4
#: the most channels that convolution outputs: a head on a 512-channel map then costs a
#: quarter of one 3 x 3 convolution of its block (C -> C would cost a whole one)
WIDTH = 128


def default_head(shape: tuple[int, ...], size: int, per_position: bool = False, tokens: bool = False,
                 pooled: int | None = POOLED) -> nn.Module:
    """A head for a node output of per-sample ``shape`` that predicts ``size`` values, per
    sample or (``per_position``) per position of a [T, D] output:

    - per position, [T, D] -> :class:`TokenHead` on each position;
    - token features [T, D] (``tokens``), per sample -> mean over T, :class:`TokenHead`;
    - [C] -> Linear(C, size);
    - maps [C, L] and [C, H, W] -> :func:`map_head`, a small convolutional head on the
      map average-pooled to at most ``pooled`` per side (None: at full resolution);
    - other shapes -> flatten, Linear.
    """
    if per_position or (tokens and len(shape) == 2):
        if len(shape) != 2:
            raise ValueError(f"a per-position head needs node outputs [B, T, D], got "
                             f"[B, {', '.join(map(str, shape))}]: give heads= a factory")
        head = TokenHead(shape[1], size)
        return head if per_position else nn.Sequential(MeanOverPositions(), head)
    if len(shape) == 1:
        return nn.Linear(shape[0], size)
    if len(shape) in (2, 3):
        return map_head(shape, size, pooled)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), size))


def map_head(shape: tuple[int, ...], size: int, pooled: int | None = POOLED) -> nn.Module:
    """The head of a feature map of per-sample ``shape`` [C, L] or [C, H, W]: average-pool
    to at most ``pooled`` per side (None: no pooling, ``heads="full"``), Conv(C, W, 3,
    padding 1) with W = min(C, WIDTH), ReLU, average-pool to 2 per side, flatten,
    Linear(2W or 4W, size).

    Why a convolution (DGL's auxiliary networks have them too): on MNIST-1D's 8-node 1-D
    CNN (greedy, SGD lr 0.03, seeds 0-3, bench/rules/converge.py's training loop with each
    candidate given as heads=) a linear head on the map pooled to 2 reached 90.0%
    test accuracy (pooled to 4: 92.9%), this head 93.7%, a convolution at the map's full
    resolution 94.3% (bp: 95.5%). In the converged benchmark (bench/rules/converge.py, lr
    chosen on validation, 3 seeds, a constant lr then) it moved greedy from 90.7 to 92.4%
    at 8 nodes but from 93.0 to 91.2% at 4, and made pgl steady (8 nodes: 76.1 ± 18.6 ->
    94.3 ± 1.3%; 4 nodes: 77.4 -> 92.5%); over greedy, sgr, bll and pgl at 4 and 8 nodes the
    mean rose from 88.4 to 92.9%.

    Why pooling first by default: it keeps the head at a few percent of a full-resolution
    node's FLOPs and activations (for a 32 x 32 map, 1/64 of a conv layer), which is what
    makes early exits cheap. Unpooled, the head's convolution costs as much as a node's own
    C -> C convolution (a quarter of it for C = 4 WIDTH), and it learns better features: on
    that CNN, with one lr drop, greedy's validation accuracy rose by about one point (see
    the README's converged table), so ``heads="full"`` is the choice when accuracy matters
    more than training FLOPs and exits.
    """
    channels, sides = shape[0], shape[1:]
    width = min(channels, WIDTH)
    pool, conv = (nn.AdaptiveAvgPool1d, nn.Conv1d) if len(sides) == 1 else (nn.AdaptiveAvgPool2d, nn.Conv2d)
    first = [] if pooled is None else [pool(tuple(min(side, pooled) for side in sides))]
    return nn.Sequential(*first, conv(channels, width, 3, padding=1), nn.ReLU(), pool(2), nn.Flatten(),
                         nn.Linear(width * 2 ** len(sides), size))


class TokenHead(nn.Sequential):
    """Per-token head [..., D] -> [..., V]: LayerNorm(D), then Linear(D, V), or a rank-RANK
    factorisation of it when V > RANK and that is smaller (a 50k vocabulary must not cost
    a 50k x D matrix per node). Its cross-entropy (:meth:`loss`) never holds the logits of
    every token: the last Linear and the loss run together, CHUNK tokens at a time."""

    def __init__(self, features: int, size: int) -> None:
        if size > RANK and RANK * (features + size) < features * size:
            proj = [nn.Linear(features, RANK, bias=False), nn.Linear(RANK, size)]
        else:
            proj = [nn.Linear(features, size)]
        super().__init__(nn.LayerNorm(features), *proj)

    def loss(self, h: torch.Tensor, target: torch.Tensor, objective: objectives.Objective) -> torch.Tensor:
        """``objective(self(h), target)`` for h [..., D]; cross-entropy without the [N, V]
        logits, their log-softmax or their gradient alive at once (same value and gradients)."""
        if type(objective) is not objectives.CrossEntropy or not objectives.lean():
            return objective(self(h), target)
        z = h
        for layer in list(self)[:-1]:
            z = layer(z)
        last = self[-1]
        return _LinearCrossEntropy.apply(z.reshape(-1, z.shape[-1]), last.weight, last.bias, target.reshape(-1),
                                         objective.ignore_index)


class _LinearCrossEntropy(torch.autograd.Function):
    """mean CE(z Wᵀ + b, labels) for z [N, R], W [V, R], b [V], labels [N] (``ignore``
    skipped), CHUNK rows of logits at a time: the forward keeps z and the log-sum-exp per
    row, the backward recomputes each chunk's logits (one extra [CHUNK, R] x [R, V] GEMM)."""

    @staticmethod
    def forward(ctx, z, weight, bias, labels, ignore):
        valid = labels != ignore
        safe = labels.where(valid, 0)
        lse, picked = [], []
        for start in range(0, len(z), objectives.CHUNK):
            logits = F.linear(z[start:start + objectives.CHUNK], weight, bias)
            lse.append(torch.logsumexp(logits, 1))
            picked.append(logits.gather(1, safe[start:start + objectives.CHUNK, None])[:, 0])
        lse, picked = torch.cat(lse), torch.cat(picked)
        ctx.save_for_backward(z, weight, bias, labels, lse, valid)
        return ((lse - picked) * valid).sum() / valid.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        z, weight, bias, labels, lse, valid = ctx.saved_tensors
        scale = (grad / valid.sum()) * valid.to(z.dtype)
        dz = torch.empty_like(z)
        dw = torch.zeros_like(weight)
        db = None if bias is None else torch.zeros_like(bias)
        for start in range(0, len(z), objectives.CHUNK):
            rows = slice(start, start + objectives.CHUNK)
            logits = F.linear(z[rows], weight, bias)
            g = objectives.softmax_minus_onehot(logits, lse[rows], labels[rows], valid[rows], scale[rows], logits)
            torch.mm(g, weight, out=dz[rows])
            dw.addmm_(g.t(), z[rows])
            if db is not None:
                db += g.sum(0)
        return dz, dw, db, None, None


class MeanOverPositions(nn.Module):
    """[B, T, D] -> [B, D], the mean over positions (any T)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean(1)
