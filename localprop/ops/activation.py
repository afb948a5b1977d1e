"""Activations of fused nodes: names, the integer codes the kernels use, and the
PyTorch reference of sigma and of sigma' (from what the transform keeps)."""
from __future__ import annotations

import math

import torch

# The integer code of each activation: the one definition on the Python side, imported by
# the Triton kernels (localprop.kernels) and the fake kernels (fake.py). The C++ and CUDA
# ops take the same codes from csrc/activation.h (enum Activation), which C++ cannot import
# from here; tests/ops/test_constants.py checks that the two lists agree.
NONE, RELU, TANH, SIGMOID, GELU = 0, 1, 2, 3, 4

#: Name -> code.
CODES = {None: NONE, "relu": RELU, "tanh": TANH, "sigmoid": SIGMOID, "gelu": GELU}


def code(activation: str | None) -> int:
    """The kernel code of ``activation``; ValueError naming the known ones otherwise."""
    if activation not in CODES:
        known = ", ".join(repr(k) for k in CODES)
        raise ValueError(f"unknown activation {activation!r}; expected one of {known}")
    return CODES[activation]


def apply(z: torch.Tensor, activation: str | None, inplace: bool = False) -> torch.Tensor:
    """sigma(z), the same functions torch.nn.functional computes (GELU: exact erf form);
    ``inplace`` overwrites z (not for GELU)."""
    if activation is None:
        return z
    if inplace:
        return {"relu": torch.relu_, "tanh": torch.tanh_, "sigmoid": torch.sigmoid_}[activation](z)
    return {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
            "gelu": torch.nn.functional.gelu}[activation](z)


def pack_mask(positive: torch.Tensor) -> torch.Tensor:
    """Pack a bool [B, N] mask into uint8 [B, ceil(N/8)], bit j of byte i = column 8i+j."""
    rows, n = positive.shape
    padded = torch.zeros(rows, (n + 7) // 8 * 8, dtype=torch.uint8, device=positive.device)
    padded[:, :n] = positive
    weights = (1 << torch.arange(8, device=positive.device, dtype=torch.uint8))
    return (padded.view(rows, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: uint8 [B, ceil(N/8)] -> bool [B, N]."""
    bits = (mask.unsqueeze(-1) >> torch.arange(8, device=mask.device, dtype=torch.uint8)) & 1
    return bits.view(mask.shape[0], -1)[:, :n].bool()


def keep_for_grad(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    """What the transform keeps so that sigma'(z) can be formed later (see csrc/activation.h):
    a packed mask for ReLU, z for GELU, and an empty tensor otherwise (tanh and sigmoid
    derive sigma' from h itself)."""
    if activation == "relu":
        return pack_mask(z > 0)
    if activation == "gelu":
        return z
    return z.new_empty(0)


def times_grad(g: torch.Tensor, h: torch.Tensor, aux: torch.Tensor, activation: str | None) -> torch.Tensor:
    """g ⊙ sigma'(z), computed from (h, aux), overwriting g (ReLU: a masked fill, no
    float copy of the mask)."""
    if activation is None:
        return g
    if activation == "relu":
        return g.masked_fill_(~unpack_mask(aux, h.shape[1]), 0)
    return g.mul_(grad(h, aux, activation))


def grad(h: torch.Tensor, aux: torch.Tensor, activation: str) -> torch.Tensor:
    """sigma'(z) as a tensor like ``h`` from (h, aux), for tanh, sigmoid and GELU."""
    if activation == "tanh":
        return 1 - h * h
    if activation == "sigmoid":
        return h * (1 - h)
    z = aux  # gelu
    cdf = 0.5 * (1 + torch.erf(z * math.sqrt(0.5)))
    return cdf + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
