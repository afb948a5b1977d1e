"""Learning rules, one file each. ``resolve("greedy")`` or ``resolve(Greedy())``."""
from __future__ import annotations

from .base import LocalRule, Rule, StepResult
from .bp import BP
from .bll import BLL
from .critic import Critic
from .greedy import Greedy
from .locprop import LocProp
from .pgl import PGL
from .sgr import SGR

#: rule name -> factory with working defaults
REGISTRY = {
    "bp": lambda: BP(),
    "bp+checkpoint": lambda: BP(checkpoint=True),
    "greedy": lambda: Greedy(),
    "sgr": lambda: SGR(),
    "critic": lambda: Critic(),
    "bll": lambda: BLL(),
    "pgl": lambda: PGL(),
    "locprop": lambda: LocProp(),
}


def resolve(rule: str | Rule) -> Rule:
    """A Rule instance from a name in REGISTRY or an instance (returned as is)."""
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str) and rule in REGISTRY:
        return REGISTRY[rule]()
    raise ValueError(f"unknown rule {rule!r}; expected a Rule instance or one of {', '.join(REGISTRY)}")


__all__ = ["Rule", "LocalRule", "StepResult", "BP", "Greedy", "SGR", "Critic", "BLL", "PGL", "LocProp",
           "REGISTRY", "resolve"]
