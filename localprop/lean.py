"""Memory-lean layers: the same arithmetic as PyTorch's, keeping less for the backward.

:class:`BatchNormReLU` is BatchNorm followed by ReLU as one layer. Under autograd the pair
holds the BatchNorm's input and the ReLU's output for the backward and, in it, the
gradient at the BatchNorm's output as a full tensor beside the gradient at the ReLU's
output: four activations of the map's size at the backward's peak. When the input needs
no gradient (the first layer of a node), this layer computes the weight's and bias's
gradients from the ReLU's output gradient a slice of the batch at a time, so its peak is
three maps (the input, the output and the output's gradient) plus a slice. On a node whose
working set is one full-resolution BatchNorm + ReLU (a VGG's first block), that is a
quarter less memory.

``localize(..., lean=True)`` puts it in place of every BatchNorm directly followed by a
ReLU (the ReLU becomes an ``nn.Identity``; parameters, buffers and state_dict keys stay).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

#: the batch is processed in this many slices in the backward: each slice's temporaries
#: are 1/SLICES of the map, the Python loop costs SLICES small kernel launches per tensor
SLICES = 8
#: the exact BatchNorm classes replaced (subclasses may compute something else)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _BatchNormReLU(torch.autograd.Function):
    """y = relu(batch_norm(x)) with batch statistics, for an x that needs no gradient;
    saves x, y, the batch mean and 1/std, and gives the gradients of weight and bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor: float, eps: float):
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, factor, eps)
        y.relu_()
        ctx.save_for_backward(x, y, mean, invstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, y, mean, invstd = ctx.saved_tensors
        dims = [0] + list(range(2, x.dim()))
        view = [1, -1] + [1] * (x.dim() - 2)
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        m = mean.to(acc).view(view)
        dbeta = torch.zeros(x.shape[1], dtype=acc, device=x.device)
        dgamma = torch.zeros_like(dbeta)
        for xc, yc, gc in _chunks(x, y, gy):  # the ReLU's gradient g and the two sums, a slice at a time
            g = torch.where(yc > 0, gc, 0).to(acc)
            dbeta += g.sum(dims)
            dgamma += (g * (xc.to(acc) - m)).sum(dims)
        dgamma *= invstd.to(acc)
        # autograd casts them to the parameters' dtype
        return None, dgamma if ctx.needs_input_grad[1] else None, dbeta if ctx.needs_input_grad[2] else None, \
            None, None, None, None


def _slice(x: torch.Tensor) -> int:
    return max(1, -(-x.shape[0] // SLICES))


def _chunks(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """The tensors [B, C, ...] cut into the same slices of the batch."""
    return list(zip(*(t.split(_slice(tensors[0])) for t in tensors)))


class BatchNormReLU(nn.modules.batchnorm._BatchNorm):
    """``relu(BatchNorm(x))`` for x [B, C, ...] (any float dtype, any layout), one layer
    whose training-mode backward keeps x, the output and the batch statistics only (see
    the module's docstring). Outputs, gradients and running statistics are those of an
    ``nn.BatchNorm{1,2,3}d`` followed by ``nn.ReLU``.

    The lean backward applies when x needs no gradient: a node's first layer, whose input
    is the previous node's detached output. When x needs one (a layer inside a node), the
    pair runs as itself: its backward frees the ReLU's output before writing x's gradient,
    which a layer that must keep the output until its own backward ends cannot. In eval
    mode (running statistics) or without autograd it runs the pair too."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"BatchNormReLU: expected an input [B, C, ...] with C = {self.num_features}, got "
                             f"shape {list(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"BatchNormReLU: expected {self.num_features} channels (dim 1), got shape "
                             f"{list(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        batch_stats = self.training or not self.track_running_stats
        if not (batch_stats and torch.is_grad_enabled()) or x.requires_grad:
            return torch.relu(super().forward(x))
        if x.numel() == x.shape[1]:  # as nn.BatchNorm: no variance from one value per channel
            raise ValueError(f"BatchNormReLU: expected more than 1 value per channel when training, got input "
                             f"shape {list(x.shape)}")
        factor = self._momentum()
        track = self.training and self.track_running_stats
        return _BatchNormReLU.apply(x, self.weight, self.bias, self.running_mean if track else None,
                                    self.running_var if track else None, factor, self.eps)

    def _momentum(self) -> float:
        """The running statistics' update factor of this step, as nn.BatchNorm's forward
        computes it (momentum None: a cumulative average), counting the step."""
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    @classmethod
    def adopt(cls, bn: nn.modules.batchnorm._BatchNorm) -> "BatchNormReLU":
        """A BatchNormReLU sharing ``bn``'s parameters and buffers (the same tensors)."""
        lean = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                   device="meta")
        for name, p in bn.named_parameters(recurse=False):
            setattr(lean, name, p)
        for name, b in bn.named_buffers(recurse=False):
            lean.register_buffer(name, b)
        lean.train(bn.training)
        return lean


def lean_layers(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """``modules`` with every BatchNorm{1,2,3}d directly followed by an nn.ReLU replaced by
    a :class:`BatchNormReLU` adopting it and the ReLU by an nn.Identity (so positions, and
    with them state_dict keys, stay); nested nn.Sequential containers are rebuilt the same
    way, the others kept. The modules given are not changed."""
    out = [nn.Sequential(*lean_layers(list(m))) if type(m) is nn.Sequential else m for m in modules]
    for i, m in enumerate(out[:-1]):
        if type(m) in BATCH_NORMS and type(out[i + 1]) is nn.ReLU:
            out[i], out[i + 1] = BatchNormReLU.adopt(m), nn.Identity()
    return out
