"""Learning rules, one file each. ``resolve("greedy")`` or ``resolve(Greedy())``."""
from __future__ import annotations

from .base import LocalRule, Rule, StepResult
from .bp import BP
from .greedy import Greedy
from .locprop import LocProp

#: rule name -> factory with working defaults
REGISTRY = {
    "bp": lambda: BP(),
    "bp+checkpoint": lambda: BP(checkpoint=True),
    "greedy": lambda: Greedy(),
    "locprop": lambda: LocProp(),
}


def resolve(rule: str | Rule) -> Rule:
    """A Rule instance from a name in REGISTRY or an instance (returned as is)."""
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str) and rule in REGISTRY:
        return REGISTRY[rule]()
    raise ValueError(f"unknown rule {rule!r}; expected a Rule instance or one of {', '.join(REGISTRY)}")


__all__ = ["Rule", "LocalRule", "StepResult", "BP", "Greedy", "LocProp", "REGISTRY", "resolve"]
