"""localize() on an MLP and a CNN: grouping, heads from the dry run, training in place."""
import pytest
import torch
from torch import nn

import localprop as lp
from localprop.localize import split_balanced, units
from tests.conftest import SGD


def mlp():
    return nn.Sequential(nn.Linear(9, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 5))


def test_units_attach_parameter_free_children_to_the_block_before():
    parts = units(list(mlp()))
    assert [len(p) for p in parts] == [2, 2, 2, 1]
    parts = units([nn.Flatten(), nn.Linear(4, 4), nn.ReLU()])
    assert [len(p) for p in parts] == [3]


@pytest.mark.parametrize("k,sizes", [(1, [4]), (2, [2, 2]), (3, [2, 1, 1]), (4, [1, 1, 1, 1])])
def test_split_balanced(k, sizes):
    parts = units(list(mlp()))
    groups = split_balanced(parts, k)
    assert [len(units(list(g)) if isinstance(g, nn.Sequential) else [g]) for g in groups] == sizes


def test_split_rejects_too_many_nodes():
    with pytest.raises(ValueError, match=r"nodes must lie in \[1, 4\]"):
        lp.localize(mlp(), num_classes=5, nodes=5)


def test_localize_mlp_trains_the_users_model_in_place(batch):
    x, y = batch
    model = mlp()
    before = [p.clone() for p in model.parameters()]
    net = lp.localize(model, rule="greedy", num_classes=5, optimizer=SGD, nodes=2)
    assert len(net.nodes) == 2
    for _ in range(3):
        stats = net.train_step(x, y)
    assert set(stats.losses) == {"0", "1"}
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    torch.testing.assert_close(net(x), model(x))


def test_localize_cnn_builds_pooled_heads_from_dry_run():
    model = cnn()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 5, (6,))
    net = lp.localize(model, num_classes=5, optimizer=SGD, example_input=x)
    assert len(net.nodes) == 3
    head0 = net.nodes[0].head
    assert isinstance(head0[0], nn.AdaptiveAvgPool2d) and head0[-1].in_features == 4 * 4
    assert net.nodes[-1].head is None
    losses = [net.train_step(x, y).losses["2"] for _ in range(30)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("shape, width", [((16, 40), 16), ((16, 3), 16), ((8, 32, 32), 8), ((300, 5, 7), 128)])
def test_default_head_of_a_map_is_a_pooled_convolution(shape, width):
    """Maps get a 3-wide convolution on the map pooled to at most 4 per side, at most
    WIDTH channels wide, then a linear layer on its 2 (2 x 2) pooled positions."""
    head = lp.heads.default_head(shape, 10)
    conv = next(m for m in head if isinstance(m, (nn.Conv1d, nn.Conv2d)))
    assert (conv.in_channels, conv.out_channels, conv.kernel_size[0]) == (shape[0], width, 3)
    assert head[0].output_size == tuple(min(side, lp.heads.POOLED) for side in shape[1:])
    assert head[-1].in_features == width * 2 ** (len(shape) - 1)
    assert head(torch.randn(3, *shape)).shape == (3, 10)


def test_full_heads_convolve_the_map_at_its_full_resolution():
    """heads="full": the convolution sees every position of the node's map (nothing pooled
    before it), the head's output is the same size, and the network trains."""
    model = cnn()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 5, (6,))
    net = lp.localize(model, num_classes=5, optimizer=SGD, example_input=x, heads="full")
    head0 = net.nodes[0].head
    assert isinstance(head0[0], nn.Conv2d)
    seen = []
    head0[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    h0 = net.nodes[0](x)
    assert head0(h0).shape == (6, 5) and seen[-1] == h0.shape
    pooled = lp.localize(cnn(), num_classes=5, optimizer=SGD, example_input=x).nodes[0].head
    assert sum(p.numel() for p in head0.parameters()) == sum(p.numel() for p in pooled.parameters())
    losses = [net.train_step(x, y).losses["0"] for _ in range(30)]
    assert losses[-1] < losses[0]


def test_localize_refuses_an_unknown_heads_name():
    with pytest.raises(ValueError, match="heads must be None, 'full', 'tokens' or a factory"):
        lp.localize(cnn(), num_classes=5, heads="pooled")


def test_localize_builds_on_first_batch_without_example():
    net = lp.localize(cnn(), num_classes=5)
    assert not net.built
    net.train_step(torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,)))
    assert net.built and net.nodes[0].input_shape == (1, 8, 8)


def test_localize_rejects_what_is_no_model():
    with pytest.raises(TypeError, match="takes an nn.Module, an nn.Sequential or a list"):
        lp.localize("resnet", num_classes=3)
    with pytest.raises(ValueError, match="Linear has no blocks to make nodes of"):
        lp.localize(nn.Linear(3, 3), num_classes=3)
