"""Labels of any integer dtype the networks accept train exactly as int64 labels, bit for
bit, under every rule, on chains of both kinds of node and on graphs."""
import pytest
import torch
from torch import nn

import localprop as lp
from localprop import rules
from tests.conftest import SGD, mlp_nodes

DTYPES = [torch.int32, torch.int16, torch.int8, torch.uint8]
STEPS = 4  # pgl's default period: its last step is a global one


def fused(rule):
    return lp.LocalSequential(*mlp_nodes([9, 16, 16, 5]), rule=rule, num_classes=5, optimizer=SGD)


def module(rule):
    model = nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))
    return lp.localize(model, rule=rule, num_classes=5, optimizer=SGD, example_input=torch.zeros(2, 9))


def graph(rule):
    g = lp.LocalGraph(rule=rule, optimizer=SGD)
    g.add("a", lp.LocalLinear(9, 16), inputs="x")
    g.add("b", lp.LocalLinear(16, 16), inputs="a")
    g.add("out", lp.LocalLinear(32, 5, activation=None), inputs=["a", "b"])
    return g.goal("out", target="y")


def trained(make, rule, dtype):
    """(losses of every step, final parameters) of STEPS steps on labels of ``dtype``."""
    torch.manual_seed(0)
    net = make(rule)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        x, y = torch.randn(8, 9, generator=gen), torch.randint(0, 5, (8,), generator=gen).to(dtype)
        result = net.train_step({"x": x}, {"y": y}) if isinstance(net, lp.LocalGraph) else net.train_step(x, y)
        losses.append(result.losses)
    return losses, [p.detach().clone() for p in net.parameters()]


def assert_same(a, b):
    assert a[0] == b[0]
    assert len(a[1]) == len(b[1]) and all(torch.equal(p, q) for p, q in zip(a[1], b[1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("make", [fused, module], ids=["fused", "module"])
@pytest.mark.parametrize("rule", list(rules.REGISTRY))
def test_every_rule_trains_on_small_integer_labels_as_on_int64(rule, make, dtype):
    if make is module and rule == "locprop":
        pytest.skip("locprop trains LocalLinear nodes only")
    assert_same(trained(make, rule, dtype), trained(make, rule, torch.int64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", ["locprop", "bp"])
def test_graphs_train_on_small_integer_labels_as_on_int64(rule, dtype):
    assert_same(trained(graph, rule, dtype), trained(graph, rule, torch.int64))


def test_other_label_dtypes_are_refused():
    net = fused("greedy")
    with pytest.raises(TypeError, match=r"labels y must be an integer tensor .*, got torch.bool"):
        net.train_step(torch.randn(4, 9), torch.zeros(4, dtype=torch.bool))
