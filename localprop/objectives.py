"""Objectives: what a chain learns, given as ``loss=`` to LocalSequential and localize().

An objective scores an output against a target, per sample and as the mean a node
learns from, and checks targets before any node learns from them. The last node's
output is scored directly; every other node's head predicts the same kind of output.

- ``"cross_entropy"`` (default): class indices, per sample (output [B, C], target [B]) or
  per position (output [B, T, C], target [B, T]: the class dimension is the last, as in
  language models); targets equal to ``ignore_index`` (-100) do not count;
- ``"mse"``: float targets shaped like the output ([B, D], [B, T, D], ...);
- any callable ``(output, target) -> loss``: a scalar, or per-sample losses [B] whose
  mean is learnt (needed by rules that weigh samples, such as critic).
"""
from __future__ import annotations

import abc
import contextlib
import contextvars
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .errors import LABEL_DTYPE_NAMES, LABEL_DTYPES

#: the objectives known by name
NAMES = ("cross_entropy", "mse")
#: the target value that cross-entropy skips (PyTorch's convention)
IGNORE_INDEX = -100
#: rows of logits the lean cross-entropies hold at a time ([CHUNK, C] in float)
CHUNK = 1024
#: set inside twice_differentiable(): the lean cross-entropies have no second derivative
_PLAIN = contextvars.ContextVar("plain_cross_entropy", default=False)


def logits_classes(where: str, out: tuple[int | None, ...], num_classes: int | None) -> int:
    """C, the number of classes of a cross-entropy whose output has per-sample shape
    ``out`` ([C] or [T, C]; None where a dimension varies): ``num_classes`` when given,
    checked against it; ValueError naming ``where`` (the last node) otherwise."""
    if len(out) not in (1, 2) or out[-1] is None or out[-1] < 2:
        raise ValueError(f"{where}: with loss 'cross_entropy' the last node outputs the logits, "
                         f"[B, C] or [B, T, C] with C >= 2 classes, got [B, {', '.join(map(str, out))}]; "
                         f"for another output give loss='mse' or a callable")
    if num_classes is not None and out[-1] != num_classes:
        shape = f"[{num_classes}]" if len(out) == 1 else f"[T, {num_classes}]"
        raise ValueError(f"{where}: the last node must output the logits, shape {shape} per sample "
                         f"for num_classes={num_classes}, got [{', '.join(map(str, out))}]")
    return out[-1]


class Objective(abc.ABC):
    """Base of the objectives. ``classes``: the targets are class indices over the
    output's last dimension (so heads predict logits and predict() takes an argmax)."""

    name = "custom"
    classes = False

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss [] a node learns from."""
        return self.per_sample(output, target).mean()

    @abc.abstractmethod
    def per_sample(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of each sample [B] (its mean over the sample's positions)."""

    def check_target(self, where: str, y: torch.Tensor, batch: int, output_shape: tuple[int, ...]) -> torch.Tensor:
        """The target ``y`` (named ``where`` in errors, e.g. "y") checked against a batch of
        ``batch`` outputs of per-sample shape ``output_shape`` (None for a dimension that
        varies), in the dtype the loss needs; ValueError or TypeError otherwise."""
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"the target {where} must be a tensor, got {type(y).__name__}")
        if y.dim() == 0 or y.shape[0] != batch:
            raise ValueError(f"x and {where} disagree: x has a batch of {batch}, {where} has shape {list(y.shape)}")
        return y


class CrossEntropy(Objective):
    """Cross-entropy over class indices; the class dimension is the output's last."""

    name = "cross_entropy"
    classes = True

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = ignore_index

    def __call__(self, output, target):
        # the mean over every counted position, as F.cross_entropy takes it; per position
        # (a vocabulary of logits per token) without keeping a log-softmax as large as them
        logits, labels = output.reshape(-1, output.shape[-1]), target.reshape(-1)
        if output.dim() > 2 and not _PLAIN.get():
            return _LeanCrossEntropy.apply(logits, labels, self.ignore_index)
        return F.cross_entropy(logits, labels, ignore_index=self.ignore_index)

    def per_sample(self, output, target):
        losses = F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1),
                                 ignore_index=self.ignore_index, reduction="none").view(target.shape)
        if target.dim() == 1:
            return losses
        counted = (target != self.ignore_index).flatten(1).sum(1).clamp_min(1)
        return losses.flatten(1).sum(1) / counted

    def check_target(self, where, y, batch, output_shape):
        y = super().check_target(where, y, batch, output_shape)
        if y.dtype not in LABEL_DTYPES:
            raise TypeError(f"labels {where} must be an integer tensor ({LABEL_DTYPE_NAMES}), got {y.dtype}")
        expected = (batch, *output_shape[:-1])
        if not shape_matches(y.shape, expected):
            raise ValueError(f"labels {where} for outputs of shape [B, {show_shape(output_shape)}] must have shape "
                             f"[{show_shape(expected)}], got {list(y.shape)}")
        counted = y[y != self.ignore_index]
        if counted.numel():
            lo, hi, classes = int(counted.min()), int(counted.max()), output_shape[-1]
            if lo < 0 or hi >= classes:
                raise ValueError(f"labels must lie in [0, {classes}), got values in [{lo}, {hi}] "
                                 f"({self.ignore_index} marks a position to ignore)")
        return y.long()

    def __repr__(self) -> str:
        return "CrossEntropy()" if self.ignore_index == IGNORE_INDEX else f"CrossEntropy({self.ignore_index})"


class MSE(Objective):
    """Mean squared error against float targets shaped like the output."""

    name = "mse"

    def __call__(self, output, target):
        return F.mse_loss(output, target)

    def per_sample(self, output, target):
        return (output - target).pow(2).flatten(1).mean(1)

    def check_target(self, where, y, batch, output_shape):
        y = super().check_target(where, y, batch, output_shape)
        if not y.is_floating_point():
            raise TypeError(f"loss 'mse' needs a floating-point target {where}, got {y.dtype}")
        if not shape_matches(y.shape, (batch, *output_shape)):
            raise ValueError(f"the target {where} must have the output's shape [{batch}, {show_shape(output_shape)}], "
                             f"got {list(y.shape)}")
        return y

    def __repr__(self) -> str:
        return "MSE()"


class Custom(Objective):
    """A user's ``fn(output, target) -> loss`` (a scalar, or per-sample losses [B])."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, output, target):
        value = self._value(output, target)
        return value.mean() if value.dim() else value

    def per_sample(self, output, target):
        value = self._value(output, target)
        if value.shape != (output.shape[0],):
            raise ValueError(f"loss {self.name!r}: this rule needs per-sample losses, shape [{output.shape[0]}], "
                             f"got {list(value.shape)}: return fn(output, target) without the batch mean")
        return value

    def _value(self, output, target):
        value = self.fn(output, target)
        if not isinstance(value, torch.Tensor) or value.dim() > 1:
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"loss {self.name!r} must return a scalar or per-sample losses [B], got {got}")
        return value

    def __repr__(self) -> str:
        return f"Custom({self.name})"


@contextlib.contextmanager
def twice_differentiable():
    """Inside the block, cross-entropies are PyTorch's own, which have a second derivative
    (an exact input-gradient penalty takes one); outside, the lean ones save memory."""
    token = _PLAIN.set(True)
    try:
        yield
    finally:
        _PLAIN.reset(token)


def lean() -> bool:
    """True where the lean cross-entropies may be used (outside :func:`twice_differentiable`)."""
    return not _PLAIN.get()


class _LeanCrossEntropy(torch.autograd.Function):
    """The mean cross-entropy of logits [N, C] against labels [N] (``ignore`` skipped) that
    keeps no log-softmax: it saves the logits (alive anyway, as the graph's output) and
    the log-sum-exp per row [N]; the backward writes softmax − onehot straight into the
    gradient, CHUNK rows at a time. One [N, C] tensor less than F.cross_entropy."""

    @staticmethod
    def forward(ctx, logits, labels, ignore):
        lse = torch.cat([torch.logsumexp(c, 1) for c in logits.split(CHUNK)])
        valid = labels != ignore
        picked = logits.gather(1, labels.where(valid, 0)[:, None])[:, 0]
        ctx.save_for_backward(logits, labels, lse, valid)
        return ((lse - picked) * valid).sum() / valid.sum()  # nan when none counts, as PyTorch's

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, labels, lse, valid = ctx.saved_tensors
        scale = (grad / valid.sum()) * valid.to(logits.dtype)
        out = torch.empty_like(logits)
        for start in range(0, len(logits), CHUNK):
            rows = slice(start, start + CHUNK)
            softmax_minus_onehot(logits[rows], lse[rows], labels[rows], valid[rows], scale[rows], out[rows])
        return out, None, None


def softmax_minus_onehot(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                         scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = scale · (softmax(logits) − onehot(labels)) for rows [n, C] (the gradient of a
    cross-entropy), written in place; ignored rows (``valid`` False) have scale 0."""
    torch.sub(logits, lse[:, None], out=out)
    out.exp_()
    out.scatter_add_(1, labels.where(valid, 0)[:, None], -valid.to(out.dtype)[:, None])
    return out.mul_(scale[:, None])


def resolve(loss: str | Objective | Callable | None) -> Objective:
    """The objective for ``loss=``: a name of :data:`NAMES`, an :class:`Objective`, a
    callable ``(output, target) -> loss``, or None (cross-entropy)."""
    if loss is None or loss == "cross_entropy":
        return CrossEntropy()
    if loss == "mse":
        return MSE()
    if isinstance(loss, Objective):
        return loss
    if callable(loss) and not isinstance(loss, str):
        return Custom(loss)
    raise ValueError(f"loss must be one of {', '.join(map(repr, NAMES))} or a callable (output, target) -> loss, "
                     f"got {loss!r}")


def shape_matches(shape, expected) -> bool:
    """True if ``shape`` has ``expected``'s sizes where they are not None."""
    return len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))


def show_shape(shape) -> str:
    """A shape for messages, "*" where it varies: (None, 50) -> "*, 50"."""
    return ", ".join("*" if s is None else str(s) for s in shape)
