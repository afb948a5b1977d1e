"""The example rule of one file (tests/rules/example_rule.py) trains on both kinds of
node through the one node protocol; its distributed run is in tests/test_distributed.py."""
import pytest
import torch
from torch import nn

import localprop as lp
from localprop import data
from localprop.training import fit
from tests.rules.example_rule import HardExampleGreedy


@pytest.mark.parametrize("kind", ["fused", "module"])
def test_a_rule_of_one_file_learns_on_both_node_kinds(kind):
    torch.manual_seed(0)
    split = data.digits()
    if kind == "fused":
        net = lp.mlp([64, 64, 64, 10], rule=HardExampleGreedy())
    else:
        net = lp.LocalSequential(nn.Sequential(nn.Linear(64, 64), nn.ReLU()),
                                 nn.Sequential(nn.Linear(64, 64), nn.ReLU()), nn.Linear(64, 10),
                                 rule=HardExampleGreedy(), num_classes=10)
    fit(net, split, epochs=3, progress=False)
    accuracy = (net.predict(split.x_test).labels == split.y_test).float().mean()
    assert accuracy > 0.85  # greedy reaches 0.86 in the same budget (0.90 for this rule)


def test_the_forward_message_weights_the_next_nodes_loss():
    torch.manual_seed(0)
    net = lp.mlp([8, 16, 3], rule=HardExampleGreedy(smoothing=0.0))
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    net.build(x)
    rule = net.rule
    first = rule.node_step(net, 0, x, y, None, 0)
    assert first.forward.shape == first.h.shape
    # uniform previous losses give weights 1: the plain cross-entropy of the last node
    plain = torch.nn.functional.cross_entropy(net.nodes[1](first.h), y)
    last = rule.node_step(net, 1, first.h, y, torch.ones_like(first.h), 0)
    torch.testing.assert_close(last.loss, plain)
