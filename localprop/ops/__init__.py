"""Fused ops of a linear node, one dispatch point each, with their PyTorch references.

- :func:`transform`: z = u Wᵀ + b, h = σ(z)
- :func:`head_error`: head logits, cross-entropy, ε = (dlogits A) ⊙ σ'(z), message ε W
- :func:`update`: W, b <- optimizer step with dW = εᵀ u, db = Σ ε

Rules never call these directly: nodes do (see localprop.nodes).
"""
from .backends import BackendUnavailable, resolve
from .head_error import HeadError, head_error, head_error_ref
from .transform import transform, transform_ref
from .update import LinearGrad, update, update_ref

__all__ = ["BackendUnavailable", "resolve", "HeadError", "head_error", "head_error_ref",
           "transform", "transform_ref", "LinearGrad", "update", "update_ref"]
