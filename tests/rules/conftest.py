import copy
import functools

import torch
from torch import nn

import localprop as lp
from localprop import data


def updates(make_net, rule, x, y, nodes_only=False):
    """The change one training step of ``rule`` makes to every parameter (``nodes_only``:
    the nodes' own, heads excluded) of a fresh network from ``make_net(rule)`` (built
    under a fixed seed, so every call starts equal)."""
    torch.manual_seed(0)
    net = make_net(rule).build(x)
    params = [p for node in net.nodes for n, p in node.named_parameters() if not n.startswith("head.")] \
        if nodes_only else list(net.parameters())
    before = copy.deepcopy([p.detach() for p in params])
    net.train_step(x, y)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def digits_mlp(rule, width=256, depth=4, seed=0):
    """The demo's MLP (4 fused nodes, 256 wide, SGD lr 0.05 momentum 0.9) under ``seed``."""
    from localprop.cli.demo import mlp

    torch.manual_seed(seed)
    return mlp(rule, width=width, depth=depth)


def digits_cnn() -> nn.Sequential:
    """Two 3x3 convolutions on digits' 8x8 images and a linear classifier."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 64, 10))


def localized_digits_cnn(rule, split):
    """:func:`digits_cnn` localized for ``rule`` on ``split`` (digits as images), SGD lr 0.02
    momentum 0.9, under seed 0."""
    torch.manual_seed(0)
    return lp.localize(digits_cnn(), rule=rule, num_classes=10, example_input=split.x_train[:2],
                       optimizer=functools.partial(torch.optim.SGD, lr=0.02, momentum=0.9))


DIGITS = data.digits()
