"""lp.mlp and lp.mlp_nodes: shapes, activations, keyword arguments, construction order, errors."""
import functools

import pytest
import torch

import localprop as lp
from localprop import config, rules


def test_nodes_shapes_and_activations():
    nodes = lp.mlp_nodes([9, 16, 12, 4])
    assert all(isinstance(n, lp.LocalLinear) for n in nodes)
    assert [(n.in_features, n.out_features) for n in nodes] == [(9, 16), (16, 12), (12, 4)]
    assert [n.activation for n in nodes] == ["relu", "relu", None]
    assert [tuple(n.weight.shape) for n in nodes] == [(16, 9), (12, 16), (4, 12)]
    assert [tuple(n.bias.shape) for n in nodes] == [(16,), (12,), (4,)]
    assert all(n.weight.dtype == torch.float32 for n in nodes)


def test_two_widths_give_one_node_without_activation():
    (node,) = lp.mlp_nodes([5, 3], activation="tanh")
    assert (node.in_features, node.out_features, node.activation) == (5, 3, None)


def test_nodes_options_are_passed_on():
    nodes = lp.mlp_nodes((6, 8, 2), activation="tanh", bias=False, dtype=torch.float64, device="cpu")
    assert [n.activation for n in nodes] == ["tanh", None]
    assert all(n.bias is None and n.weight.dtype == torch.float64 and n.weight.device.type == "cpu"
               for n in nodes)


def test_same_parameters_as_nodes_built_by_hand():
    torch.manual_seed(3)
    built = lp.mlp_nodes([9, 16, 12, 4])
    torch.manual_seed(3)
    hand = [lp.LocalLinear(9, 16), lp.LocalLinear(16, 12), lp.LocalLinear(12, 4, activation=None)]
    for a, b in zip(built, hand):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_mlp_network_kwargs_and_default_num_classes(batch):
    x, y = batch
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    net = lp.mlp([9, 16, 5], rule="sgr", optimizer=sgd, backend="reference", check_finite=False)
    assert isinstance(net, lp.LocalSequential)
    assert net.num_classes == 5 and net.rule.name == "sgr" and net.backend == "reference"
    assert not net.check_finite
    assert all(isinstance(o, torch.optim.SGD) for o in net.optimizers())
    assert net(x).shape == (13, 5)
    net.train_step(x, y)


def test_mlp_dtype_and_heads_follow_the_nodes():
    net = lp.mlp([9, 16, 5], dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in net.parameters())
    assert net.nodes[0].head is not None and net.nodes[-1].head is None
    assert net(torch.randn(3, 9, dtype=torch.float64)).dtype == torch.float64


def test_mlp_is_built_in_the_order_of_local_sequential_of_nodes():
    torch.manual_seed(5)
    a = lp.mlp([9, 16, 12, 4], rule="greedy")
    after_a = torch.random.get_rng_state()
    torch.manual_seed(5)
    b = lp.LocalSequential(*lp.mlp_nodes([9, 16, 12, 4]), rule="greedy", num_classes=4)
    assert torch.equal(after_a, torch.random.get_rng_state())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.endswith("_extra_state"))


def test_mlp_num_classes_other_than_last_width_is_refused():
    with pytest.raises(ValueError, match="num_classes=3"):
        lp.mlp([9, 16, 5], num_classes=3)


@pytest.mark.parametrize("widths,error", [
    ([9], ValueError), ([], ValueError), ([9, 0, 5], ValueError), ([9, -2, 5], ValueError),
    ([9, 16.0, 5], TypeError), ([9, True, 5], TypeError), ("9,5", TypeError), (9, TypeError), (None, TypeError),
])
def test_bad_widths_name_expected_and_received(widths, error):
    with pytest.raises(error) as info:
        lp.mlp_nodes(widths)
    message = str(info.value)
    assert "mlp: widths must be a sequence of >= 2 integer layer widths >= 1" in message
    assert f"got {widths!r} ({type(widths).__name__})" in message
    with pytest.raises(error, match="mlp: widths"):
        lp.mlp(widths)


def test_unknown_activation_is_refused_even_without_hidden_nodes():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        lp.mlp_nodes([4, 2], activation="swish")


# ---- the one rule registry --------------------------------------------------------------
def test_resolve_and_config_build_from_the_one_registry():
    assert not hasattr(config, "RULE_CLASSES")
    for name in rules.REGISTRY:
        assert rules.resolve(name).name == name
        assert config.rule({"rule": name}).name == name
    made = config.rule({"rule": {"name": "bp+checkpoint", "segment": 2}})
    assert isinstance(made, rules.BP) and made.checkpoint and made.name == "bp+checkpoint"
    assert config.rule({"rule": {"name": "sgr", "lam": 0.25}}).lam == 0.25


def test_unknown_rule_lists_the_names_once():
    names = ", ".join(rules.REGISTRY)
    with pytest.raises(ValueError) as info:
        rules.resolve("nope")
    assert str(info.value) == f"unknown rule 'nope'; expected a Rule instance or one of {names}"
    with pytest.raises(config.ConfigError) as info:
        config.rule({"rule": "nope"})
    assert str(info.value) == (f"config key 'rule': expected one of {names}, or \"module:Class\" of a Rule, "
                               f"received 'nope' (str)")
    assert str(info.value).count("greedy") == 1
