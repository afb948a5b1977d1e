"""The errors of distributed training."""
from __future__ import annotations

class DistributedError(RuntimeError):
    """Another rank died, hung past the timeout, or broke the connection."""


class NotDecoupled(ValueError):
    """The rule needs global backpropagation (or state over all nodes) at every step."""
