"""Optimizers that follow their parameters: after ``net.to(dtype or device)`` each node's
optimizer must step the moved parameters with its state (momentum buffers, Adam's
moments) beside them, or the next step fails (the fused kernels check that the state has
the parameter's dtype and device) or, on autograd nodes, mixes dtypes silently."""
from __future__ import annotations

import torch
from torch import nn


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
