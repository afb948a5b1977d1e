"""What the library does to the nodes' ``torch.optim`` optimizers.

- Optimizers that follow their parameters: after ``net.to(dtype or device)`` each node's
  optimizer must step the moved parameters with its state (momentum buffers, Adam's
  moments) beside them, or the next step fails (the fused kernels check that the state has
  the parameter's dtype and device) or, on autograd nodes, mixes dtypes silently.
- Steps in the backward (``step_in_backward=True``): each parameter steps as soon as its
  gradient is accumulated, and that gradient is freed at once, so a node's backward never
  holds all of its parameters' gradients together (what it saves: the node's parameter
  gradients, where they are large beside its activations).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn

#: optimizers whose update of a parameter reads only that parameter, its gradient and its
#: own state, so that stepping the parameters one at a time is the same update
PER_PARAMETER = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
                 torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta,
                 torch.optim.Rprop, torch.optim.ASGD)


def check_per_parameter(optimizer: torch.optim.Optimizer, node: str) -> None:
    """ValueError naming the node and the class unless ``optimizer`` is one of
    :data:`PER_PARAMETER` (step_in_backward steps its parameters one at a time)."""
    if not isinstance(optimizer, PER_PARAMETER):
        raise ValueError(f"node {node}: step_in_backward=True steps each parameter alone as its gradient "
                         f"arrives, which is the same update only for optimizers that update each parameter "
                         f"from its own gradient and state ({', '.join(c.__name__ for c in PER_PARAMETER)}); "
                         f"got {type(optimizer).__name__}")


@contextlib.contextmanager
def stepping_in_backward(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Within: a backward that accumulates a gradient into one of ``optimizer``'s
    parameters steps that parameter at once (``optimizer.step()`` over it alone, its
    optimizer hooks included) and frees the gradient (``.grad = None``). A parameter used
    twice in the graph gets one accumulated gradient and one step, as after the backward.
    For :data:`PER_PARAMETER` optimizers: the same parameters and state as one
    ``optimizer.step()`` after the backward."""
    step = functools.partial(_step_alone, optimizer)
    handles = [p.register_post_accumulate_grad_hook(step)
               for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _step_alone(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> None:
    """``optimizer.step()`` over ``param`` only (every group but its own emptied for the
    call, then restored), then its gradient freed."""
    kept = [group["params"] for group in optimizer.param_groups]
    try:
        for group, params in zip(optimizer.param_groups, kept):
            group["params"] = [param] if any(p is param for p in params) else []
        optimizer.step()
    finally:
        for group, params in zip(optimizer.param_groups, kept):
            group["params"] = params
    param.grad = None


def follow_parameters(optimizer: torch.optim.Optimizer, replaced: dict[int, nn.Parameter]) -> None:
    """Make ``optimizer`` follow its parameters after they moved.

    ``replaced``: id of a Parameter -> the Parameter that replaced it, for conversions that
    make new Parameters (``torch.__future__.set_overwrite_module_params_on_conversion``);
    its param groups and state then hold the new ones. Each state tensor is placed as
    ``Optimizer.load_state_dict`` places a loaded state: that of a floating-point parameter
    takes its dtype and device, another its device, and ``step`` stays as it is (with
    ``fused`` or ``capturable``: float32 on the parameter's device).
    """
    groups = {}
    for group in optimizer.param_groups:
        group["params"] = [replaced.get(id(p), p) for p in group["params"]]
        groups.update((id(p), group) for p in group["params"])
    for old in list(optimizer.state):
        param = replaced.get(id(old), old)
        values = optimizer.state.pop(old)
        group = groups.get(id(param), {})
        optimizer.state[param] = {key: _placed(value, param, key, group) for key, value in values.items()}


def _placed(value, param: torch.Tensor, key, group: dict):
    """One state value where torch.optim's load_state_dict would put it for ``param``."""
    if not isinstance(value, torch.Tensor):
        return value
    if key == "step":  # kept on the CPU unless fused or capturable (torch.optim's note on step)
        fused = group.get("fused") or group.get("capturable")
        return value.to(dtype=torch.float32, device=param.device) if fused else value
    if param.is_floating_point():
        return value.to(dtype=param.dtype, device=param.device)
    return value.to(device=param.device)
