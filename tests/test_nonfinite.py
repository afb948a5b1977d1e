"""An update that makes a parameter non-finite raises FloatingPointError in the step that
makes it (naming the node, the step and the parameter), whatever the rule, the kind of
node and the way it updates; the step is not counted."""
import functools

import pytest
import torch
from torch import nn

import localprop as lp
from localprop.rules import BLL, PGL, SGR, Critic, LocProp
from tests.conftest import SGD, mlp_nodes

INF = float("inf")
SGD_INF = functools.partial(torch.optim.SGD, lr=INF, momentum=0.9)
#: what the error says when node k's update is the first to go non-finite
FIRST = r"node {}: non-finite parameter '[\w.]+' after the update of step 0"

RULES = {
    "greedy": lambda: "greedy", "sgr": lambda: "sgr", "sgr-fd": lambda: SGR(mode="finite_difference"),
    "critic": lambda: "critic", "bll": lambda: "bll", "pgl": lambda: "pgl",
    "pgl-global": lambda: PGL(period=1), "bp": lambda: "bp", "bp+checkpoint": lambda: "bp+checkpoint",
    "locprop": lambda: "locprop", "locprop-decoupled": lambda: LocProp(mode="decoupled"),
    "locprop-concurrent": lambda: LocProp(mode="decoupled", concurrent=True),
}
FUSED_ONLY = {"locprop", "locprop-decoupled", "locprop-concurrent"}
TOP_DOWN = {"locprop"}  # sync locprop updates the last node first


def fused(rule, optimizer=SGD_INF, **kw):
    return lp.LocalSequential(*mlp_nodes([9, 16, 5]), rule=rule, num_classes=5, optimizer=optimizer, **kw)


def module(rule, optimizer=SGD_INF):
    model = nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 5))
    return lp.localize(model, rule=rule, num_classes=5, optimizer=optimizer, example_input=torch.zeros(2, 9))


def batch():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(8, 9, generator=gen), torch.randint(0, 5, (8,), generator=gen)


def all_finite(net):
    return all(bool(torch.isfinite(p).all()) for p in net.parameters())


@pytest.mark.parametrize("kind", ["fused", "module"])
@pytest.mark.parametrize("rule", list(RULES))
def test_an_infinite_learning_rate_is_caught_in_the_step_it_wrecks(rule, kind):
    if kind == "module" and rule in FUSED_ONLY:
        pytest.skip("locprop trains LocalLinear nodes only")
    net = (fused if kind == "fused" else module)(RULES[rule]())
    with pytest.raises(FloatingPointError, match=FIRST.format(1 if rule in TOP_DOWN else 0)):
        net.train_step(*batch())
    assert net.steps == 0


@pytest.mark.parametrize("rule", ["bp", "bp+checkpoint"])
def test_bp_leaves_no_gradient_behind_when_a_node_fails(rule):
    net = fused(rule)
    with pytest.raises(FloatingPointError, match=FIRST.format(0)):
        net.train_step(*batch())
    assert all(p.grad is None for p in net.parameters())  # a resumed run's backward adds to none


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("optimizer", [SGD_INF, functools.partial(torch.optim.Adam, lr=INF)], ids=["sgd", "adam"])
def test_the_fused_update_is_checked_on_every_backend(backend, optimizer):
    net = fused("greedy", optimizer, backend=backend)
    with pytest.raises(FloatingPointError, match=r"node 0: non-finite parameter 'weight' after the update of "
                                                 r"step 0 \(\[.*\]\.\.\.\); it is not rolled back"):
        net.train_step(*batch())


@pytest.mark.parametrize("rule", ["locprop", "bp"])
def test_graphs_are_checked(rule):
    g = lp.LocalGraph(rule=rule, optimizer=SGD_INF)
    g.add("a", lp.LocalLinear(9, 16), inputs="x")
    g.add("b", lp.LocalLinear(16, 16), inputs="a")
    g.add("out", lp.LocalLinear(32, 5, activation=None), inputs=["a", "b"])
    g.goal("out", target="y")
    x, y = batch()
    with pytest.raises(FloatingPointError, match=r"node \w+: non-finite parameter '\w+' after the update of step 0"):
        g.train_step({"x": x}, {"y": y})
    assert g.steps == 0


@pytest.mark.parametrize("kind", ["fused", "module"])
@pytest.mark.parametrize("rule, owned", [(lambda: Critic(critic_optimizer=SGD_INF), r"head\.\d+\.weight"),
                                         (lambda: BLL(feedback_optimizer=SGD_INF), r"feedback\.0\.weight")],
                         ids=["critic", "feedback-net"])
def test_rule_state_wrecked_by_its_own_optimizer_is_caught(kind, rule, owned):
    """A critic's or a feedback network's own optimizer is checked by the node it serves."""
    net = (fused if kind == "fused" else module)(rule(), optimizer=SGD)
    with pytest.raises(FloatingPointError, match=rf"node 0: non-finite parameter '{owned}' after the update of step 0"):
        net.train_step(*batch())


def test_an_inverse_map_that_overflows_is_caught():
    rule = LocProp(propagation="inverse")
    rule.inverse_lr = INF  # past the constructor's check: a map update that overflows
    net = fused(rule, optimizer=SGD)
    with pytest.raises(FloatingPointError, match=r"node 1: non-finite parameter 'maps\.1' after the update of step 0"):
        net.train_step(*batch())


def test_check_finite_off_lets_the_update_through():
    net = fused("greedy", check_finite=False)
    net.train_step(*batch())
    assert net.steps == 1 and not all_finite(net)


def test_the_check_sums_first_and_names_the_first_non_finite_parameter():
    from localprop.errors import check_parameters

    layer = nn.Linear(3, 4)
    with torch.no_grad():
        layer.weight.fill_(3e38)  # finite, but its sum overflows: the elements are tested one by one
    check_parameters(list(layer.parameters()), layer, "a", 7)
    with torch.no_grad():
        layer.bias[2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"node a: non-finite parameter 'bias' after the update of step 7"):
        check_parameters(list(layer.parameters()), layer, "a", 7)
