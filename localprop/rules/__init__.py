"""Learning rules, one file each. ``resolve("greedy")`` or ``resolve(Greedy())``."""
from __future__ import annotations

import functools
from typing import Callable

from .base import LocalRule, Rule, StepResult
from .bp import BP
from .bll import BLL
from .critic import Critic
from .greedy import Greedy
from .locprop import LocProp
from .pgl import PGL
from .sgr import SGR

#: rule name -> factory: ``REGISTRY[name](**kwargs)`` builds the rule with the keyword
#: arguments of its class (none: its working defaults). The one registry of rule names:
#: :func:`resolve` and the config's "rule" key (localprop.config.rule) both build from it.
REGISTRY: dict[str, Callable[..., Rule]] = {
    "bp": BP,
    "bp+checkpoint": functools.partial(BP, checkpoint=True),
    "greedy": Greedy,
    "sgr": SGR,
    "critic": Critic,
    "bll": BLL,
    "pgl": PGL,
    "locprop": LocProp,
}


def resolve(rule: str | Rule) -> Rule:
    """A Rule instance from a name in REGISTRY (built with its defaults) or an instance
    (returned as is); ValueError listing the registered names otherwise."""
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str) and rule in REGISTRY:
        return REGISTRY[rule]()
    raise ValueError(f"unknown rule {rule!r}; expected a Rule instance or one of {', '.join(REGISTRY)}")

__all__ = ["Rule", "LocalRule", "StepResult", "BP", "Greedy", "SGR", "Critic", "BLL", "PGL", "LocProp",
           "REGISTRY", "resolve"]
