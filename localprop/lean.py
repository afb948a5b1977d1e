"""Memory-lean layers: the same arithmetic as PyTorch's, keeping less for the backward.

:class:`BatchNorm` is a BatchNorm whose training-mode backward writes its input's gradient
a slice of the batch at a time into one new tensor. PyTorch's CPU kernel allocates a second
tensor of the map's size beside that gradient, so at the backward of a BatchNorm (a
residual block's second one, whose output is added to the shortcut) the lean layer holds
one map less. On other devices it runs PyTorch's own kernel: the saving is the CPU
kernel's, and slicing costs kernel launches.

:class:`BatchNormReLU` is BatchNorm followed by ReLU as one layer. Under autograd the pair
holds the BatchNorm's input and the ReLU's output for the backward and, in it, the
gradient at the BatchNorm's output as a full tensor beside the gradient at the ReLU's
output: four activations of the map's size at the backward's peak. When the input needs
no gradient (the first layer of a node), this layer computes the weight's and bias's
gradients from the ReLU's output gradient a slice of the batch at a time, so its peak is
three maps (the input, the output and the output's gradient) plus a slice. On a node whose
working set is one full-resolution BatchNorm + ReLU (a VGG's first block), that is a
quarter less memory. When the input needs a gradient it runs as the lean BatchNorm and a
ReLU.

``localize(..., lean=True)`` puts BatchNormReLU in place of every BatchNorm directly
followed by a ReLU in an ``nn.Sequential`` (the ReLU becomes an ``nn.Identity``), and the
lean BatchNorm in place of every other BatchNorm, in any model; parameters, buffers and
state_dict keys stay.
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


def _acc(x: torch.Tensor) -> torch.dtype:
    """The dtype the sums over the batch are taken in: float32 for half-precision x."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _view(x: torch.Tensor) -> list[int]:
    """The shape [1, C, 1, ...] that broadcasts a per-channel vector over x [B, C, ...]."""
    return [1, -1] + [1] * (x.dim() - 2)


def _sums(pairs, mean: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of g, sum of g * (x - mean)) per channel, over ``pairs`` of slices (x_c, g_c)
    of x [B, C, ...] and of the gradient g at the BatchNorm's output."""
    dims, acc = [0] + list(range(2, x.dim())), _acc(x)
    m = mean.to(acc).view(_view(x))
    total = torch.zeros(x.shape[1], dtype=acc, device=x.device)
    centred = torch.zeros_like(total)
    for xc, g in pairs:
        g = g.to(acc)
        total += g.sum(dims)
        centred += (xc.to(acc) - m).mul_(g).sum(dims)  # one temporary slice
    return total, centred


class _BatchNorm(torch.autograd.Function):
    """y = batch_norm(x) with batch statistics; saves x, the weight, the batch mean and
    1/std, and writes x's gradient a slice at a time into one new tensor."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor: float, eps: float):
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, factor, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weight, mean, invstd = ctx.saved_tensors
        acc, view = _acc(x), _view(x)
        dbeta, centred = _sums(_chunks(x, gy), mean, x)
        gx = None
        if ctx.needs_input_grad[0]:
            # dx = w / std * (g - mean(g) - (x - mean) / std^2 * mean(g * (x - mean))), per channel
            count = x.numel() // x.shape[1]
            inv = invstd.to(acc)
            scale = (inv if weight is None else inv * weight.to(acc)).view(view)
            shift, slope, m = (dbeta / count).view(view), (centred * inv * inv / count).view(view), \
                mean.to(acc).view(view)
            gx = torch.empty_like(x)
            for xc, gc, out in _chunks(x, gy, gx):  # in place on the gradient's slice (half precision: a copy)
                t = torch.sub(xc, m, out=out) if acc == x.dtype else xc.to(acc) - m
                t.mul_(slope).neg_().add_(gc).sub_(shift).mul_(scale)
                if t is not out:
                    out.copy_(t)
        dgamma = centred * invstd.to(acc)
        return gx, dgamma if ctx.needs_input_grad[1] else None, dbeta if ctx.needs_input_grad[2] else None, \
            None, None, None, None


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
        # the ReLU's gradient, a slice at a time
        dbeta, dgamma = _sums(((xc, torch.where(yc > 0, gc, 0)) for xc, yc, gc in _chunks(x, y, gy)), mean, x)
        dgamma *= invstd.to(dgamma.dtype)
        # autograd casts them to the parameters' dtype
        return None, dgamma if ctx.needs_input_grad[1] else None, dbeta if ctx.needs_input_grad[2] else None, \
            None, None, None, None


def _slice(x: torch.Tensor) -> int:
    return max(1, -(-x.shape[0] // SLICES))


def _chunks(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """The tensors [B, C, ...] cut into the same slices of the batch."""
    return list(zip(*(t.split(_slice(tensors[0])) for t in tensors)))


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """``BatchNorm(x)`` for x [B, C, ...] (any float dtype, any layout) whose training-mode
    backward writes x's gradient a slice of the batch at a time (see the module's
    docstring). Outputs, gradients and running statistics are those of an
    ``nn.BatchNorm{1,2,3}d``; in eval mode (running statistics), without autograd or off
    the CPU it runs as one."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if x.dim() < 2:
            raise ValueError(f"{name}: expected an input [B, C, ...] with C = {self.num_features}, got "
                             f"shape {list(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{name}: expected {self.num_features} channels (dim 1), got shape {list(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self._lean() and x.device.type == "cpu"):
            return super().forward(x)
        return self._apply_lean(_BatchNorm, x)

    def _lean(self) -> bool:
        """Whether this call takes the lean path: batch statistics under autograd."""
        return (self.training or not self.track_running_stats) and torch.is_grad_enabled()

    def _apply_lean(self, function, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[1]:  # as nn.BatchNorm: no variance from one value per channel
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel when training, got "
                             f"input shape {list(x.shape)}")
        factor = self._momentum()
        track = self.training and self.track_running_stats
        return function.apply(x, self.weight, self.bias, self.running_mean if track else None,
                              self.running_var if track else None, factor, self.eps)

    def _momentum(self) -> float:
        """The running statistics' update factor of this step, as nn.BatchNorm's forward
        computes it (momentum None: a cumulative average), counting the step."""
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    @classmethod
    def adopt(cls, bn: nn.modules.batchnorm._BatchNorm) -> "BatchNorm":
        """A layer of this class sharing ``bn``'s parameters and buffers (the same tensors)."""
        lean = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                   device="meta")
        for name, p in bn.named_parameters(recurse=False):
            setattr(lean, name, p)
        for name, b in bn.named_buffers(recurse=False):
            lean.register_buffer(name, b)
        lean.train(bn.training)
        return lean


class BatchNormReLU(BatchNorm):
    """``relu(BatchNorm(x))`` for x [B, C, ...] (any float dtype, any layout), one layer
    whose training-mode backward keeps x, the output and the batch statistics only (see
    the module's docstring). Outputs, gradients and running statistics are those of an
    ``nn.BatchNorm{1,2,3}d`` followed by ``nn.ReLU``.

    The lean backward applies when x needs no gradient: a node's first layer, whose input
    is the previous node's detached output. When x needs one (a layer inside a node), it
    runs as the lean :class:`BatchNorm` and a ReLU: the ReLU's backward frees its output
    before the BatchNorm writes x's gradient, which a layer that must keep the output until
    its own backward ends cannot. In eval mode (running statistics) or without autograd it
    runs the pair."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad or not self._lean():
            return torch.relu(super().forward(x))
        self._check_input_dim(x)
        return self._apply_lean(_BatchNormReLU, x)


def lean_layers(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """``modules`` with every BatchNorm{1,2,3}d directly followed by an nn.ReLU replaced by
    a :class:`BatchNormReLU` adopting it and the ReLU by an nn.Identity (so positions, and
    with them state_dict keys, stay), and every other one by a lean :class:`BatchNorm`;
    nested nn.Sequential containers are rebuilt the same way, the other modules kept (see
    :func:`make_lean` for those). The modules given are not changed."""
    out = [nn.Sequential(*lean_layers(list(m))) if type(m) is nn.Sequential else m for m in modules]
    for i, m in enumerate(out):
        if type(m) in BATCH_NORMS:
            pair = i + 1 < len(out) and type(out[i + 1]) is nn.ReLU
            out[i] = (BatchNormReLU if pair else BatchNorm).adopt(m)
            if pair:
                out[i + 1] = nn.Identity()
    return out


def make_lean(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace, in place, every BatchNorm{1,2,3}d among ``model``'s submodules by a lean
    :class:`BatchNorm` adopting its parameters and buffers (the same tensors, the same
    state_dict keys; a BatchNorm followed by ``F.relu`` in a module's own code keeps that
    ReLU). Returns what it replaced, (parent, attribute, former module), to undo it."""
    replaced = []
    for name, child in list(model.named_children()):
        if type(child) in BATCH_NORMS:
            setattr(model, name, BatchNorm.adopt(child))
            replaced.append((model, name, child))
        else:
            replaced += make_lean(child)
    return replaced
