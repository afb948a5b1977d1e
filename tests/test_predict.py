"""Progressive inference is sound: eval mode for its duration, no node run on an empty
remainder, a sample's answer independent of the rest of its batch."""
import pytest
import torch
from torch import nn

import localprop as lp


def bn_net(backend="reference"):
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU()),
              nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU()), nn.Linear(16, 3)]
    net = lp.LocalSequential(*blocks, rule="greedy", num_classes=3, backend=backend)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(3):
        net.train_step(x, y)
    return net, x


def calls(net):
    """Counts of each node's forward calls, by hooks."""
    count = [0] * len(net.nodes)
    for k, node in enumerate(net.nodes):
        node.register_forward_hook(lambda m, i, o, k=k: count.__setitem__(k, count[k] + 1))
    return count


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_no_node_runs_once_every_sample_has_exited(backend):
    why = lp.ops.backends.why_unavailable(backend, torch.device("cpu"))
    if why:
        pytest.skip(why)
    torch.manual_seed(0)
    net = lp.LocalSequential(lp.LocalLinear(8, 16), lp.LocalLinear(16, 16), lp.LocalLinear(16, 3, activation=None),
                             rule="greedy", num_classes=3, backend=backend)
    x = torch.randn(10, 8)
    net.train_step(x, torch.randint(0, 3, (10,)))
    net.flops()  # counted once by a dry run through every node, before the hooks
    count = calls(net)
    pred = net.predict(x, exit_threshold=0.0)  # every head's max softmax exceeds 0
    assert (pred.exit_node == 0).all()
    assert count == [1, 0, 0]
    head0 = net.flops().nodes[0] + net.flops().heads[0]
    assert pred.flops_fraction == pytest.approx(head0 / net.flops().full)


def test_threshold_one_runs_no_head_and_costs_the_full_forward():
    """No softmax probability exceeds 1, so at threshold 1 no head could let a sample out:
    none runs, every sample exits at the last node, at a cost of exactly 1."""
    net, x = bn_net()
    heads = [0]
    for node in net.nodes[:-1]:
        node.head.register_forward_hook(lambda m, i, o: heads.__setitem__(0, heads[0] + 1))
    pred = net.predict(x, exit_threshold=1.0)
    assert heads == [0] and pred.flops_fraction == 1.0 and (pred.exit_node == len(net.nodes) - 1).all()
    assert torch.equal(pred.labels, net.predict(x).labels)


def test_predict_runs_in_eval_mode_and_restores_the_modes():
    net, x = bn_net()
    net.nodes[1].block[1].eval()  # a user's own choice of mode survives predict
    stats = [b.running_mean.clone() for b in (net.nodes[0].block[1], net.nodes[1].block[1])]
    together = net.predict(x, exit_threshold=0.6)
    alone = [net.predict(x[i:i + 1], exit_threshold=0.6) for i in range(len(x))]
    # with batch statistics a sample's exit and label would depend on its batch
    assert torch.equal(together.labels, torch.cat([p.labels for p in alone]))
    assert torch.equal(together.exit_node, torch.cat([p.exit_node for p in alone]))
    assert all(torch.equal(s, b.running_mean) for s, b in zip(stats, (net.nodes[0].block[1], net.nodes[1].block[1])))
    assert net.training and net.nodes[0].block[1].training and not net.nodes[1].block[1].training


def test_ensemble_runs_in_eval_mode():
    net, x = bn_net()
    together = net.predict(x, ensemble=True)
    assert torch.equal(together.labels, torch.cat([net.predict(x[i:i + 1], ensemble=True).labels
                                                   for i in range(len(x))]))
    assert net.training


@pytest.mark.parametrize("threshold", [True, "0.5", 1.5, -0.1])
def test_exit_threshold_must_be_a_probability(threshold):
    net, x = bn_net()
    with pytest.raises(ValueError, match="exit_threshold must lie in"):
        net.predict(x, exit_threshold=threshold)


def test_per_node_thresholds_skip_the_heads_of_nodes_without_an_exit():
    """A sequence gives each node but the last its own threshold; None: no exit there, and
    that node's head neither runs nor is counted."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(8 if k == 0 else 16, 16), nn.ReLU()) for k in range(3)] + [nn.Linear(16, 3)]
    net = lp.LocalSequential(*blocks, rule="greedy", num_classes=3)
    x = torch.randn(16, 8)
    net.train_step(x, torch.randint(0, 3, (16,)))
    flops = net.flops()
    ran = [0] * 3
    for k, node in enumerate(net.nodes[:-1]):
        node.head.register_forward_hook(lambda m, i, o, k=k: ran.__setitem__(k, ran[k] + 1))
    pred = net.predict(x, exit_threshold=[None, 0.0, None])  # every sample leaves at node 1
    assert ran == [0, 1, 0] and (pred.exit_node == 1).all()
    assert pred.flops_fraction == pytest.approx((flops.nodes[0] + flops.nodes[1] + flops.heads[1]) / flops.full)
    heads1 = net.nodes[1].head(net.nodes[1](net.nodes[0](x)))
    assert torch.equal(pred.labels, heads1.argmax(1))
    # the same threshold everywhere is the scalar form
    uniform = net.predict(x, exit_threshold=[0.6] * 3)
    scalar = net.predict(x, exit_threshold=0.6)
    assert torch.equal(uniform.labels, scalar.labels) and torch.equal(uniform.exit_node, scalar.exit_node)
    assert uniform.flops_fraction == scalar.flops_fraction
    # no exit anywhere: the full model at exactly its cost
    none = net.predict(x, exit_threshold=[None] * 3)
    assert none.flops_fraction == 1.0 and torch.equal(none.labels, net.predict(x).labels)


@pytest.mark.parametrize("thresholds, match", [([0.5], "expected 2 entries, got 1"),
                                               ([0.5, None, 0.5], "expected 2 entries, got 3"),
                                               ([None, 2.0], r"\(node 1\), got 2.0")])
def test_per_node_thresholds_are_checked(thresholds, match):
    net, x = bn_net()
    with pytest.raises(ValueError, match=match):
        net.predict(x, exit_threshold=thresholds)
