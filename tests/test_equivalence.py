"""Rules bp and greedy against hand-written PyTorch loops, and gradient isolation."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import localprop as lp
from tests.conftest import SGD, mlp_nodes


def plain_mlp(sizes, dtype):
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b, dtype=dtype))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def batches(n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(11, 9, generator=gen, dtype=dtype), torch.randint(0, 4, (11,), generator=gen))
            for _ in range(n)]


def train_alongside(net, reference: nn.Module, dtype: torch.dtype) -> None:
    """Five steps of ``net`` and, on the same batches, of a plain backprop loop on ``reference``."""
    opt = SGD(reference.parameters())
    for x, y in batches(5, dtype):
        net.train_step(x, y)
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt.step()


@pytest.mark.parametrize("rule", ["bp", "bp+checkpoint"])
def test_bp_matches_plain_loop(rule):
    torch.manual_seed(0)
    model = plain_mlp([9, 16, 12, 4], torch.float32)
    reference = copy.deepcopy(model)
    net = lp.localize(model, rule=rule, num_classes=4, optimizer=SGD)
    train_alongside(net, reference, torch.float32)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_bp_on_fused_nodes_matches_plain_loop():
    torch.manual_seed(0)
    nodes = mlp_nodes([9, 16, 12, 4], torch.float64)
    reference = plain_mlp([9, 16, 12, 4], torch.float64)
    with torch.no_grad():
        for node, lin in zip(nodes, [m for m in reference if isinstance(m, nn.Linear)]):
            lin.weight.copy_(node.weight)
            lin.bias.copy_(node.bias)
    net = lp.LocalSequential(*nodes, rule="bp", num_classes=4, optimizer=SGD)
    train_alongside(net, reference, torch.float64)
    lins = [m for m in reference if isinstance(m, nn.Linear)]
    for node, lin in zip(nodes, lins):
        assert torch.equal(node.weight, lin.weight) and torch.equal(node.bias, lin.bias)


def greedy_by_hand(blocks, heads, data):
    """The greedy loop written out: per block, its head's CE, backward, step, detach."""
    opts = [SGD(list(b.parameters()) + (list(h.parameters()) if h else [])) for b, h in zip(blocks, heads)]
    for x, y in data:
        h = x
        for block, head, opt in zip(blocks, heads, opts):
            out = block(h.detach())
            loss = F.cross_entropy(head(out) if head else out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            h = out


def test_greedy_matches_plain_loop_on_modules():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(9, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 12), nn.Tanh()),
              nn.Linear(12, 4)]
    ref_blocks = copy.deepcopy(blocks)
    data = batches(5, torch.float32)
    net = lp.localize(blocks, rule="greedy", num_classes=4, optimizer=SGD, example_input=data[0][0])
    ref_heads = [copy.deepcopy(n.head) for n in net.nodes]
    for x, y in data:
        net.train_step(x, y)
    greedy_by_hand(ref_blocks, ref_heads, data)
    for node, block, head in zip(net.nodes, ref_blocks, ref_heads):
        for p, q in zip(node.block.parameters(), block.parameters()):
            assert torch.equal(p, q)
        if head is not None:
            for p, q in zip(node.head.parameters(), head.parameters()):
                assert torch.equal(p, q)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "gelu"])
def test_greedy_on_fused_nodes_matches_plain_loop(activation):
    """The BP-free path (no autograd) takes exactly the steps of an autograd greedy loop."""
    torch.manual_seed(0)
    nodes = mlp_nodes([9, 16, 12, 4], torch.float64, activation)
    net = lp.LocalSequential(*nodes, rule="greedy", num_classes=4, optimizer=SGD, backend="reference")
    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}[activation]
    blocks = []
    for node in nodes:
        lin = nn.Linear(node.in_features, node.out_features, dtype=torch.float64)
        lin.load_state_dict({"weight": node.weight.detach().clone(), "bias": node.bias.detach().clone()})
        blocks.append(nn.Sequential(lin, act()) if node.activation else lin)
    heads = [copy.deepcopy(n.head) for n in nodes]
    data = batches(5, torch.float64)
    for x, y in data:
        net.train_step(x, y)
    greedy_by_hand(blocks, heads, data)
    for node, block in zip(nodes, blocks):
        lin = block[0] if isinstance(block, nn.Sequential) else block
        torch.testing.assert_close(node.weight, lin.weight, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(node.bias, lin.bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_gradient_isolation(fused):
    """A node's update depends on its own objective only: changing every later node
    (parameters and heads) leaves node 0's step unchanged, and node 0 changes."""
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        if fused:
            return lp.LocalSequential(*mlp_nodes([9, 16, 12, 4], torch.float64), rule="greedy",
                                      num_classes=4, optimizer=SGD, backend="reference")
        blocks = [nn.Sequential(nn.Linear(9, 16, dtype=torch.float64), nn.ReLU()),
                  nn.Sequential(nn.Linear(16, 12, dtype=torch.float64), nn.ReLU()),
                  nn.Linear(12, 4, dtype=torch.float64)]
        return lp.localize(blocks, num_classes=4, optimizer=SGD, example_input=torch.zeros(2, 9, dtype=torch.float64))

    a, b = make(), make()
    before = a.nodes[0].weight.clone() if fused else a.nodes[0].block[0].weight.clone()
    with torch.no_grad():
        for node in b.nodes[1:]:
            for p in node.parameters():
                p.mul_(-3).add_(1)
    x, y = batches(1, torch.float64)[0]
    a.train_step(x, y)
    b.train_step(x, y)
    for p, q in zip(a.nodes[0].parameters(), b.nodes[0].parameters()):
        assert torch.equal(p, q)
    after = a.nodes[0].weight if fused else a.nodes[0].block[0].weight
    assert not torch.equal(before, after)
