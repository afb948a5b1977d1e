"""Networks built from their layer widths.

    net = lp.mlp([64, 256, 256, 10], rule="greedy")   # 3 LocalLinear nodes, 10 classes
    nodes = lp.mlp_nodes([64, 256, 10])                # the nodes alone, for a network built by hand
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch

from .engine import LocalSequential
from .errors import received
from .nodes import LocalLinear
from .ops import activation as act


def mlp_nodes(widths: Sequence[int], *, activation: str | None = "relu", bias: bool = True,
              dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> list[LocalLinear]:
    """The LocalLinear nodes of an MLP with layer widths ``[in, h1, ..., out]``.

    Node k maps widths[k] -> widths[k+1]: weight [widths[k+1], widths[k]], bias
    [widths[k+1]] (none with ``bias=False``), followed by ``activation`` ("relu", "tanh",
    "gelu", "sigmoid" or None), except the last node, which has none (it outputs logits).
    Shapes: input [B, widths[0]] float; node k's output [B, widths[k+1]]; the last's
    [B, widths[-1]]. Parameters are in ``dtype`` (default torch's default dtype, float32)
    on ``device`` (default torch's default device, the CPU), initialised as ``nn.Linear``'s.

    The nodes are built first to last, so from the same global RNG state they hold the
    same parameters as ``LocalLinear`` nodes built one by one in that order.

    Raises TypeError if ``widths`` is not a sequence of integers, ValueError if it has
    fewer than 2 or one below 1, and ValueError for an unknown activation; each names what
    was expected and what was received.
    """
    expected = "a sequence of >= 2 integer layer widths >= 1, [in, h1, ..., out]"
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not all(
            isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in widths):
        raise TypeError(f"mlp: widths must be {expected}, got {received(widths)}")
    if len(widths) < 2 or any(w < 1 for w in widths):
        raise ValueError(f"mlp: widths must be {expected}, got {received(widths)}")
    act.code(activation)  # also when no hidden node uses it
    widths = [int(w) for w in widths]
    kw = {"bias": bias, "dtype": dtype, "device": device}
    hidden = [LocalLinear(a, b, activation=activation, **kw) for a, b in zip(widths[:-2], widths[1:-1])]
    return hidden + [LocalLinear(widths[-2], widths[-1], activation=None, **kw)]


def mlp(widths: Sequence[int], *, activation: str | None = "relu", bias: bool = True,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
        **network_kwargs: Any) -> LocalSequential:
    """A LocalSequential of the nodes :func:`mlp_nodes` builds from ``widths`` (see there for
    shapes, dtypes and errors); ``network_kwargs`` go to LocalSequential (rule, optimizer,
    backend, check_finite, num_classes; num_classes defaults to widths[-1]).

    Input [B, widths[0]] float of ``dtype``; logits [B, widths[-1]]. Built in the same order
    as ``LocalSequential(*mlp_nodes(widths, ...), **network_kwargs)``: nodes first, then
    the rule's heads.
    """
    nodes = mlp_nodes(widths, activation=activation, bias=bias, dtype=dtype, device=device)
    network_kwargs.setdefault("num_classes", nodes[-1].out_features)
    return LocalSequential(*nodes, **network_kwargs)


__all__ = ["mlp", "mlp_nodes"]
