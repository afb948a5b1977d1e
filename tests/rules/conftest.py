import copy

import torch

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


DIGITS = data.digits()
