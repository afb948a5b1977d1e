"""Bad hyperparameters of the seed rules raise ValueError naming the argument, what it
expects and what it got."""
import pytest

import localprop as lp
from localprop.rules import BLL, PGL, SGR, Critic


@pytest.mark.parametrize("make, match", [
    (lambda: SGR(lam=-0.1), r"SGR: lam must be >= 0, got -0\.1"),
    (lambda: SGR(lam=float("nan")), r"SGR: lam must be >= 0, got nan"),
    (lambda: SGR(distance="l1"), r"SGR: distance must be one of l2, cosine, got 'l1'"),
    (lambda: SGR(mode="forward"), r"SGR: mode must be one of auto, exact, finite_difference, got 'forward'"),
    (lambda: SGR(eps=0), r"SGR: eps must be > 0, got 0"),
    (lambda: Critic(critic_every=0), r"Critic: critic_every must be an int >= 1, got 0"),
    (lambda: Critic(critic_every=1.5), r"Critic: critic_every must be an int >= 1, got 1\.5"),
    (lambda: Critic(critic="mlp"), r"Critic: critic must be a callable .* got str"),
    (lambda: BLL(lam_dec=-1), r"BLL: lam_dec must be >= 0, got -1"),
    (lambda: BLL(lam_cls=-1), r"BLL: lam_cls must be >= 0, got -1"),
    (lambda: PGL(period=0), r"PGL: period must be an int >= 1 .*, got 0"),
    (lambda: PGL(local="bp"), r"PGL: local must be a local rule .*, got 'bp'"),
    (lambda: PGL(local="nope"), r"unknown rule 'nope'"),
])
def test_bad_hyperparameters_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_rules_resolve_by_name():
    for name, cls in (("sgr", SGR), ("critic", Critic), ("bll", BLL), ("pgl", PGL)):
        assert type(lp.rules.resolve(name)) is cls and lp.rules.resolve(name).name == name
