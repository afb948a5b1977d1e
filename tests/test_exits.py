"""Exit thresholds chosen on held-out data: the search's simulation is exactly what
predict() does, and its choice keeps the accuracy it promises at fewer FLOPs."""
import random

import pytest
import torch
from torch import nn

import localprop as lp
from localprop import exits


def trained(rule="greedy", nodes=4, seed=0):
    """A small chain trained a little on separable data, so that heads disagree in confidence."""
    torch.manual_seed(seed)
    widths = [10] + [24] * (nodes - 1)
    blocks = [nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths, widths[1:])] + [nn.Linear(24, 3)]
    net = lp.LocalSequential(*blocks, rule=rule, num_classes=3,
                             optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    x = torch.randn(300, 10)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    for _ in range(30):
        for i in range(0, 300, 50):
            net.train_step(x[i:i + 50], y[i:i + 50])
    return net, x, y


@pytest.mark.parametrize("rule", ["greedy", "critic"])
def test_simulation_is_what_predict_does(rule):
    net, x, y = trained(rule)
    with lp.engine._eval_mode(net), torch.no_grad():
        scores = exits.scores(net, x, batch_size=64)  # batches smaller than x: joined as one pass
    rng = random.Random(0)
    for _ in range(20):
        thresholds = [rng.choice([None, 0.0, 0.4, 0.6, 0.9, 0.99, 1.0]) for _ in range(len(net.nodes) - 1)]
        labels, exit_node, flops = exits.simulate(scores, thresholds)
        p = net.predict(x, exit_threshold=thresholds)
        assert torch.equal(labels, p.labels) and torch.equal(exit_node, p.exit_node), thresholds
        assert flops == pytest.approx(p.flops_fraction, rel=1e-12), thresholds


def test_the_choice_keeps_its_accuracy_at_fewer_flops():
    net, x, y = trained()
    full = float((net.predict(x).labels == y).float().mean())
    uniform = net.choose_exits(x, y, tolerance=0.02, per_node=False)
    each = net.choose_exits(x, y, tolerance=0.02)
    assert uniform.full_accuracy == each.full_accuracy == pytest.approx(full)
    assert len(set(uniform.thresholds)) == 1
    for choice in (uniform, each):  # what predict gives at the choice is what was promised
        p = net.predict(x, exit_threshold=choice.thresholds)
        assert float((p.labels == y).float().mean()) == pytest.approx(choice.accuracy)
        assert p.flops_fraction == pytest.approx(choice.flops_fraction)
        assert choice.accuracy >= full - 0.02
    assert each.flops_fraction <= uniform.flops_fraction <= 1.0
    assert each.flops_fraction < 1.0  # on this easy problem early heads are confident and right
    # a tolerance of 0 can always be met: at worst by no exits, the full model
    strict = net.choose_exits(x, y, tolerance=0.0)
    assert strict.accuracy >= full and strict.flops_fraction <= 1.0


@pytest.mark.parametrize("args, match", [
    (dict(tolerance=1.0), "tolerance is a fraction"),
    (dict(tolerance=-0.1), "tolerance is a fraction"),
    (dict(y=torch.zeros(5, dtype=torch.int64)), r"expected shape \(300,\)"),
    (dict(y=torch.zeros(300)), "integer dtype"),
])
def test_bad_arguments_are_named(args, match):
    net, x, y = trained(nodes=2)
    with pytest.raises(ValueError, match=match):
        net.choose_exits(x, args.pop("y", y), **args)


def test_a_network_without_heads_has_no_exits_to_choose():
    net, x, y = trained(rule="bp", nodes=2)
    with pytest.raises(ValueError, match="no exit to choose"):
        net.choose_exits(x, y)
