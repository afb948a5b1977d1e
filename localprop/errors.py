"""Checks shared by the engine and the rules, with errors that name the node (or the rule
and its argument), what was expected and what was received."""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence

import torch
from torch import nn

#: dtypes of class labels the networks accept; converted to int64 once, at validation
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
#: the same, as error messages name them
LABEL_DTYPE_NAMES = "int64, int32, int16, int8 or uint8"


def _first_non_finite(values: Sequence[torch.Tensor]) -> int | None:
    """Index of the first tensor of ``values`` with a NaN or inf, or None; one host sync
    when all are finite (see :func:`check_finite` for why the sum goes first)."""
    if len(values) == 1:
        total = values[0].detach() if values[0].numel() == 1 else values[0].detach().sum()
    else:
        total = torch.stack([v.detach().sum() for v in values]).sum()
    if math.isfinite(total.item()):
        return None
    # a non-finite sum may be an overflow of finite elements: only the elements can tell
    return next((i for i, v in enumerate(values) if not bool(torch.isfinite(v).all())), None)


def _head(value: torch.Tensor) -> str:
    return f"{value.detach().flatten()[:4].tolist()}..."


def check_finite(value: torch.Tensor, node: str, step: int, what: str) -> None:
    """Raise FloatingPointError naming ``node`` and ``step`` if ``value`` has a NaN or inf.
    Costs one device-to-host sync.

    The sum is tested first: an inf or NaN element makes any sum inf or NaN, so a finite
    sum proves every element finite, and a sum costs far less than isfinite's bool tensor
    (CPU, one thread, [256, 1024] float32: 36 us vs 1.7 ms). Only a non-finite sum, which finite
    elements can also give by overflowing, has the elements tested one by one. The sum (or
    a scalar itself) is read with item(): one call instead of isfinite, all and bool
    (7.2 us -> 0.3 us for a scalar loss)."""
    if _first_non_finite([value]) is not None:
        raise FloatingPointError(
            f"node {node}: non-finite {what} at step {step} ({_head(value)}); "
            f"no parameter of this node was changed. Lower the learning rate or check the inputs.")


def check_parameters(params: Sequence[torch.Tensor], owner: nn.Module, node: str, step: int) -> None:
    """Raise FloatingPointError naming ``node``, ``step`` and the parameter (by its name in
    ``owner``) if an update just made one of ``params`` non-finite. Called after every
    update of a node, its head and a rule's own modules (critics, feedback nets, maps),
    so that the step that wrecks a parameter is the one that fails.

    What is left after the error: the update is NOT rolled back. The parameter (and the
    optimizer's state, e.g. its momentum buffer) holds the non-finite values, as do any
    other parameters the same update wrote; nodes updated earlier in the step keep their
    updates, later nodes are not updated (under bp every node steps before any is checked,
    so that no gradient is left in .grad). Rolling back would need a copy of every
    parameter before each update: torch.optim and the fused update kernels write in place,
    and the result of a step cannot be known before it is written. The network's step
    counter is not advanced, and the exception stops training before the loop that called
    train_step can save a checkpoint of the wreck: resume from the last checkpoint with a
    lower learning rate.

    The test is check_finite's sum-first test over all of ``params`` at once (one stacked
    sum, one device-to-host sync per call, i.e. per update). Measured cost, as a fraction of
    a greedy step with the checks off (CPU, one thread, cpp backend, batch 256; the
    "params alone" column of ``OMP_NUM_THREADS=1 python bench/check_finite.py``, two
    runs): fused MLPs of 4-8 nodes 256 wide 1.6-2.2% (~15 us per node, mostly the calls'
    fixed cost), 1024 wide 0.5-1.2% (a pass over W), a 3-node localized CNN 0.14-0.19%.
    """
    bad = _first_non_finite(params)
    if bad is None:
        return
    value = params[bad]
    name = next((n for n, p in owner.named_parameters() if p is value), f"of shape {list(value.shape)}")
    raise FloatingPointError(
        f"node {node}: non-finite parameter {name!r} after the update of step {step} ({_head(value)}); it is "
        f"not rolled back, so the node holds it now. Lower the learning rate (or check the inputs) and resume "
        f"from the last checkpoint.")


# ---- arguments (rules' hyperparameters) -------------------------------------------------
def received(value: Any) -> str:
    """A received argument as errors show it: its repr and its type."""
    return f"{value!r} ({type(value).__name__})"


def check_int(owner: str, arg: str, value: Any, low: int) -> int:
    """``value`` as an int >= ``low``; a bool is refused (True would pass as 1). TypeError
    for a non-integer, ValueError below ``low``; both name ``owner`` and ``arg``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{owner}: {arg} must be an int >= {low}, got {received(value)}")
    if value < low:
        raise ValueError(f"{owner}: {arg} must be an int >= {low}, got {value!r}")
    return int(value)


def check_float(owner: str, arg: str, value: Any, low: float, high: float = math.inf, *,
                open_low: bool = False, open_high: bool = False) -> float:
    """``value`` (any real number but a bool) as a finite float in the interval from
    ``low`` to ``high`` (bounds included unless open_*). TypeError for a non-number,
    ValueError for NaN, inf or a value outside; both name ``owner`` and ``arg``."""
    if high == math.inf:
        interval = f"{'>' if open_low else '>='} {low:g}"
        inside = f"be {interval}"
    else:
        interval = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        inside = f"lie {interval}"
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{owner}: {arg} must be a finite number {interval}, got {received(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{owner}: {arg} must be a finite number {interval}, got {value!r}")
    if number < low or number > high or (open_low and number == low) or (open_high and number == high):
        raise ValueError(f"{owner}: {arg} must {inside}, got {value!r}")
    return number


def check_choice(owner: str, arg: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of the names ``choices``, else ValueError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{owner}: {arg} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_bool(owner: str, arg: str, value: Any) -> bool:
    """``value`` if it is a bool (not 0/1 or another truthy thing), else TypeError."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {arg} must be a bool, got {received(value)}")
    return value


def check_callable(owner: str, arg: str, value: Any, signature: str) -> Callable | None:
    """``value`` if it is None or callable, else TypeError giving the expected ``signature``."""
    if value is not None and not callable(value):
        raise TypeError(f"{owner}: {arg} must be a callable {signature} or None, got {received(value)}")
    return value
