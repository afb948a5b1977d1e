"""The fused local update: torch.optim's SGD, Adam and AdamW applied by a kernel that
takes the gradient by its factors (dW = εᵀ u, db = Σ_b ε), never materialising dW.

The kernel only does the arithmetic; this module plays the optimizer's part: it reads
each parameter's hyperparameters from its param group and keeps the state in
``optimizer.state[p]`` under torch.optim's own keys and types (SGD: ``momentum_buffer``;
Adam/AdamW: ``step``, ``exp_avg``, ``exp_avg_sq``), so ``state_dict()`` and
``load_state_dict()`` work unchanged and a run may switch between the fused update
and ``optimizer.step()`` at any step.

Every step goes through ``optimizer.step()``: the kernels run as its closure (see
:class:`FusedStep`), so step pre/post hooks, ``lr_scheduler``'s check that the optimizer
stepped, and anything else that wraps ``step`` see a step as they do on ``nn.Linear``.

Supported: ``torch.optim.SGD`` (any momentum, dampening, nesterov, weight_decay,
maximize) and ``torch.optim.Adam`` / ``torch.optim.AdamW`` without amsgrad. Anything
else (another optimizer class, amsgrad, differentiable, capturable) falls back to
:func:`localprop.ops.update.update_ref`, which materialises the gradients and calls
``optimizer.step()``; one warning per optimizer class and reason says so.
"""
from __future__ import annotations

import warnings

import torch

from .update import LinearGrad, update_ref

_warned: set[tuple[type, str]] = set()

#: the parameter dtypes the compiled backends' kernels run (the reference runs any)
DTYPES = {"cpp": (torch.float32, torch.float64), "cuda": (torch.float32, torch.bfloat16)}


def dtype_error(backend: str, dtype: torch.dtype) -> str | None:
    """None if ``backend`` runs parameters of ``dtype``, else which backends do."""
    runs = DTYPES.get(backend)
    if runs is None or dtype in runs:
        return None
    others = [name for name, kinds in DTYPES.items() if dtype in kinds]
    where = "".join(f", {name!r} on {'a CUDA device' if name == 'cuda' else 'CPU'}" for name in others)
    return (f"backend {backend!r} runs {', '.join(str(d) for d in runs)} parameters, not {dtype}; "
            f"{dtype} runs on backend 'reference'{where}")


def update(optimizer: torch.optim.Optimizer, grads: list[LinearGrad], backend: str) -> None:
    """Apply one step of ``optimizer`` to every parameter in ``grads`` on ``backend``
    ("cpp", "cuda" or "triton"); the same effect as ``update_ref(optimizer, grads)``.

    Each LinearGrad holds weight [N, K], bias [N] or None, err [B, N] and inp [B, K],
    all of one float dtype; the parameters must belong to ``optimizer``.
    """
    reason = unsupported(optimizer)
    if reason is not None:
        _warn_fallback(optimizer, reason)
        return update_ref(optimizer, grads)
    _check_no_grad(grads)
    fused = FusedStep(optimizer, grads, backend)
    optimizer.step(fused)
    if not fused.done:
        raise RuntimeError(f"{type(optimizer).__name__}.step() returned without calling its closure, which "
                           f"applies the fused update: a step method replaced or wrapped so that it drops "
                           f"its closure argument cannot run the fused update (such a step pre-hook neither)")


def _check_no_grad(grads: list[LinearGrad]) -> None:
    """The parameters must hold no ``.grad``: ``optimizer.step()`` would apply it as a
    second step on top of the fused one."""
    for g in grads:
        for param in (g.weight, g.bias):
            if param is not None and param.grad is not None:
                raise RuntimeError(f"a parameter of shape {list(param.shape)} holds a .grad, which "
                                   f"optimizer.step() would apply on top of the fused update: free it "
                                   f"(optimizer.zero_grad()) before a fused step")


class FusedStep:
    """The closure of ``optimizer.step()`` that applies the fused update of ``grads``.

    Why a closure: every torch.optim optimizer calls its closure inside ``step()``,
    after the step pre-hooks and before the post-hooks, whatever wraps ``step`` (the
    hooks' wrapper on the class, ``lr_scheduler``'s on the instance, a user's). The
    optimizer's own update that follows finds no ``.grad`` on these parameters (the
    fused path never materialises one) and changes nothing; SGD, Adam and AdamW keep no
    step state outside ``optimizer.state``, which the kernels' callers below update."""

    def __init__(self, optimizer: torch.optim.Optimizer, grads: list[LinearGrad], backend: str) -> None:
        self.optimizer, self.grads, self.backend = optimizer, grads, backend
        self.done = False

    def __call__(self) -> None:
        self.done = True  # SGD, Adam and AdamW call their closure once
        with torch.no_grad():  # step() calls its closure with grad enabled
            apply(self.optimizer, self.grads, self.backend)
        return None


def apply(optimizer: torch.optim.Optimizer, grads: list[LinearGrad], backend: str) -> None:
    """The kernels' part of :func:`update`, outside ``optimizer.step()``: the parameters
    and ``optimizer.state`` change, no hook runs. Arguments as :func:`update`'s."""
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    step = _sgd_step if isinstance(optimizer, torch.optim.SGD) else _adam_step
    kernels = _kernels(backend)
    for g in grads:
        for param, inp in ((g.weight, g.inp), (g.bias, None)):
            if param is None:
                continue
            if id(param) not in groups:
                raise ValueError(f"a parameter of shape {list(param.shape)} is not in the optimizer's param groups")
            step(kernels, optimizer, groups[id(param)], param, g.err, inp)


def unsupported(optimizer: torch.optim.Optimizer) -> str | None:
    """None if the fused update implements ``optimizer`` exactly, else why not."""
    if type(optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        return "only torch.optim.SGD, Adam and AdamW are fused"
    for group in optimizer.param_groups:
        for flag in ("amsgrad", "differentiable", "capturable"):
            if group.get(flag, False):
                return f"{flag}=True is not fused"
    return None


def _warn_fallback(optimizer: torch.optim.Optimizer, reason: str) -> None:
    key = (type(optimizer), reason)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"localprop: the fused update does not support {type(optimizer).__name__} ({reason}); "
                  f"falling back to optimizer.step() with the gradients materialised", stacklevel=3)


def _kernels(backend: str):
    """The module holding sgd_update_ and adam_update_ for ``backend``."""
    if backend in ("cpp", "cuda"):
        return torch.ops.localprop
    from localprop.kernels import update as triton_update  # imported lazily: triton is optional
    return triton_update


def _sgd_step(kernels, optimizer, group, param, err, inp) -> None:
    momentum = float(group["momentum"])  # hyperparameters may be tensors (e.g. lr): float() them
    buf, first_step = None, False
    if momentum != 0:  # torch.optim.SGD keeps no state at all without momentum
        state = optimizer.state[param]
        buf = state.get("momentum_buffer")
        if buf is None:  # torch initialises the buffer to d_p on the first step
            buf, first_step = torch.empty_like(param, memory_format=torch.contiguous_format), True
    kernels.sgd_update_(param, err, inp, buf, float(group["lr"]), momentum, float(group["dampening"]),
                        float(group["weight_decay"]), bool(group["nesterov"]), bool(group["maximize"]),
                        first_step)
    if first_step:
        state["momentum_buffer"] = buf


def _adam_state(optimizer, group, param) -> dict:
    """optimizer.state[param], initialised as torch.optim.Adam's _init_group does."""
    state = optimizer.state[param]
    if len(state) == 0:
        # torch keeps step on the CPU in the default scalar dtype, unless fused
        fused = bool(group.get("fused"))
        dtype = torch.float32 if fused or torch.get_default_dtype() != torch.float64 else torch.float64
        device = param.device if fused else "cpu"
        state["step"] = torch.zeros((), dtype=dtype, device=device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def _adam_step(kernels, optimizer, group, param, err, inp) -> None:
    state = _adam_state(optimizer, group, param)
    state["step"] += 1
    beta1, beta2 = group["betas"]
    decoupled = bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
    kernels.adam_update_(param, err, inp, state["exp_avg"], state["exp_avg_sq"], float(group["lr"]),
                         float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
                         decoupled, bool(group["maximize"]), int(state["step"].item()))
