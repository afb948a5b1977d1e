"""Bad hyperparameters of every rule raise an error naming the rule, the argument, what it
expects and what it got: TypeError for the wrong type (a bool is not an int, a string
not a number), ValueError for a value out of range, non-finite or not among the names."""
import functools

import numpy as np
import pytest
import torch

import localprop as lp
from localprop.rules import BLL, BP, PGL, SGR, Critic, LocProp

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("make, error, match", [
    # BP
    (lambda: BP(checkpoint=1), TypeError, r"BP: checkpoint must be a bool, got 1 \(int\)"),
    (lambda: BP(segment=1.5), TypeError, r"BP: segment must be an int >= 1, got 1\.5 \(float\)"),
    (lambda: BP(segment=True), TypeError, r"BP: segment must be an int >= 1, got True \(bool\)"),
    (lambda: BP(segment=0), ValueError, r"BP: segment must be an int >= 1, got 0"),
    # SGR
    (lambda: SGR(lam=-0.1), ValueError, r"SGR: lam must be >= 0, got -0\.1"),
    (lambda: SGR(lam=NAN), ValueError, r"SGR: lam must be a finite number >= 0, got nan"),
    (lambda: SGR(lam=INF), ValueError, r"SGR: lam must be a finite number >= 0, got inf"),
    (lambda: SGR(lam=True), TypeError, r"SGR: lam must be a finite number >= 0, got True \(bool\)"),
    (lambda: SGR(lam="1"), TypeError, r"SGR: lam must be a finite number >= 0, got '1' \(str\)"),
    (lambda: SGR(distance="l1"), ValueError, r"SGR: distance must be one of l2, relative, cosine, got 'l1'"),
    (lambda: SGR(mode="forward"), ValueError,
     r"SGR: mode must be one of auto, exact, finite_difference, got 'forward'"),
    (lambda: SGR(eps=0), ValueError, r"SGR: eps must be > 0, got 0"),
    (lambda: SGR(eps=INF), ValueError, r"SGR: eps must be a finite number > 0, got inf"),
    (lambda: SGR(eps=None), TypeError, r"SGR: eps must be a finite number > 0, got None \(NoneType\)"),
    # Critic
    (lambda: Critic(critic_every=0), ValueError, r"Critic: critic_every must be an int >= 1, got 0"),
    (lambda: Critic(critic_every=1.5), TypeError, r"Critic: critic_every must be an int >= 1, got 1\.5 \(float\)"),
    (lambda: Critic(critic_every=True), TypeError, r"Critic: critic_every must be an int >= 1, got True \(bool\)"),
    (lambda: Critic(critic="mlp"), TypeError, r"Critic: critic must be a callable \(shape, num_classes\) -> nn.Module "
                                              r"or None, got 'mlp' \(str\)"),
    (lambda: Critic(critic_optimizer="adam"), TypeError, r"Critic: critic_optimizer must be a callable params -> "
                                                         r"Optimizer or None, got 'adam' \(str\)"),
    # BLL
    (lambda: BLL(lam_dec=-1), ValueError, r"BLL: lam_dec must be >= 0, got -1"),
    (lambda: BLL(lam_cls=-1), ValueError, r"BLL: lam_cls must be >= 0, got -1"),
    (lambda: BLL(lam_dec=INF), ValueError, r"BLL: lam_dec must be a finite number >= 0, got inf"),
    (lambda: BLL(lam_cls=False), TypeError, r"BLL: lam_cls must be a finite number >= 0, got False \(bool\)"),
    (lambda: BLL(feedback_optimizer=0.1), TypeError, r"BLL: feedback_optimizer must be a callable params -> "
                                                     r"Optimizer or None, got 0\.1 \(float\)"),
    # PGL
    (lambda: PGL(period=0), ValueError, r"PGL: period must be an int >= 1, got 0"),
    (lambda: PGL(period=True), TypeError, r"PGL: period must be an int >= 1, got True \(bool\)"),
    (lambda: PGL(period=2.0), TypeError, r"PGL: period must be an int >= 1, got 2\.0 \(float\)"),
    (lambda: PGL(checkpoint="yes"), TypeError, r"PGL: checkpoint must be a bool, got 'yes' \(str\)"),
    (lambda: PGL(segment=0), ValueError, r"PGL: segment must be an int >= 1, got 0"),
    (lambda: PGL(segment=1.5), TypeError, r"PGL: segment must be an int >= 1, got 1\.5 \(float\)"),
    (lambda: PGL(local="bp"), ValueError, r"PGL: local must be one of greedy, sgr, critic, bll, locprop, got 'bp'"),
    (lambda: PGL(local="nope"), ValueError, r"PGL: local must be one of greedy, sgr, critic, bll, locprop, got 'nope'"),
    (lambda: PGL(local=BP()), ValueError, r"PGL: local must be a local rule \(greedy, sgr, critic, bll, locprop\), "
                                          r"got rule 'bp'"),
    (lambda: PGL(local=3), TypeError, r"PGL: local must be a rule name \(greedy, sgr, critic, bll, locprop\) or a "
                                      r"Rule, got 3 \(int\)"),
    # LocProp
    (lambda: LocProp(propagation="x"), ValueError, r"LocProp: propagation must be one of transpose, feedback, "
                                                   r"inverse, got 'x'"),
    (lambda: LocProp(mode="async"), ValueError, r"LocProp: mode must be one of sync, decoupled, got 'async'"),
    (lambda: LocProp(eta=0), ValueError, r"LocProp: eta must be > 0, got 0"),
    (lambda: LocProp(eta=INF), ValueError, r"LocProp: eta must be a finite number > 0, got inf"),
    (lambda: LocProp(eta=True), TypeError, r"LocProp: eta must be a finite number > 0, got True \(bool\)"),
    (lambda: LocProp(concurrent=1), TypeError, r"LocProp: concurrent must be a bool, got 1 \(int\)"),
    (lambda: LocProp(inverse_lr=2), ValueError, r"LocProp: inverse_lr must lie in \(0, 2\), got 2"),
    (lambda: LocProp(inverse_lr=NAN), ValueError, r"LocProp: inverse_lr must be a finite number in \(0, 2\), got nan"),
    (lambda: LocProp(seed="a"), TypeError, r"LocProp: seed must be an int >= 0, got 'a' \(str\)"),
    (lambda: LocProp(seed=1.0), TypeError, r"LocProp: seed must be an int >= 0, got 1\.0 \(float\)"),
    (lambda: LocProp(seed=-1), ValueError, r"LocProp: seed must be an int >= 0, got -1"),
])
def test_bad_hyperparameters_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("make", [
    lambda: BP(checkpoint=True, segment=np.int64(2)),
    lambda: SGR(lam=0, eps=np.float32(1e-3)),
    lambda: Critic(critic_every=3, critic_optimizer=functools.partial(torch.optim.SGD, lr=0.1)),
    lambda: BLL(lam_dec=0, lam_cls=2),
    lambda: PGL(local=lp.rules.SGR(), period=1, checkpoint=False, segment=1),
    lambda: PGL(local="locprop"),
    lambda: LocProp(eta=2, mode="decoupled", concurrent=True, inverse_lr=1, seed=7),
])
def test_good_hyperparameters_of_any_number_type_are_accepted(make):
    rule = make()
    assert all(type(v) in (bool, int, float, str, type(None)) for v in vars(rule).values()
               if isinstance(v, (bool, int, float, str, np.generic)) or v is None)


def test_rules_resolve_by_name():
    for name, cls in (("sgr", SGR), ("critic", Critic), ("bll", BLL), ("pgl", PGL)):
        assert type(lp.rules.resolve(name)) is cls and lp.rules.resolve(name).name == name
