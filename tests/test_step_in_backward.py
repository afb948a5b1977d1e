"""step_in_backward=True: each parameter steps as its gradient arrives in the node's
backward (localprop.optim.stepping_in_backward), the same update as one optimizer step
after the backward, with a lower peak where a node's gradients are large."""
import copy
import functools

import pytest
import torch
from torch import nn

import localprop as lp
from localprop import memory
from tests.test_hooked import Tied, small_gpt, tokens

OPTIMIZERS = {
    "sgd": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
    "adam": functools.partial(torch.optim.Adam, lr=1e-2),
    "adamw": functools.partial(torch.optim.AdamW, lr=1e-2, amsgrad=True),
}


def blocks(width=9):
    torch.manual_seed(1)
    return [nn.Sequential(nn.Linear(7, width), nn.Tanh(), nn.Linear(width, width), nn.ReLU()),
            nn.Sequential(nn.Linear(width, width), nn.ReLU()), nn.Linear(width, 5)]


def batch(n=13):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 7, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def pair(rule, optimizer, **kw):
    """The same network twice, stepping after the backward and in it."""
    x, _ = batch()
    model, nets = [b.double() for b in blocks()], []
    for inside in (False, True):
        torch.manual_seed(2)
        nets.append(lp.localize(copy.deepcopy(model), rule, optimizer=optimizer, step_in_backward=inside,
                                example_input=x, **kw))
    return nets


def assert_same_training(after, inside, steps=3, inputs=batch):
    for s in range(steps):
        x, y = inputs()
        for net in (after, inside):
            torch.manual_seed(s)
            net.train_step(x, y)
    for p, q in zip(after.parameters(), inside.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
    for a, b in zip(after.optimizers(), inside.optimizers()):
        params = [(p, q) for g, h in zip(a.param_groups, b.param_groups) for p, q in zip(g["params"], h["params"])]
        assert len(a.state) == len(b.state) > 0
        for p, q in params:
            for key, value in a.state[p].items():
                torch.testing.assert_close(b.state[q][key], value, rtol=0, atol=1e-12)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("rule", ["greedy", "sgr", "critic", "bll", "pgl", "bp"])
def test_the_same_update_as_after_the_backward(rule, optimizer):
    after, inside = pair(rule, OPTIMIZERS[optimizer])
    assert inside.nodes[0].step_in_backward and not after.nodes[0].step_in_backward
    assert_same_training(after, inside)


def test_each_parameter_steps_alone_with_only_its_gradient_alive():
    """What makes the peak lower: at every optimizer step of a node exactly one parameter
    holds a gradient, and every parameter of the node steps once."""
    net = pair("greedy", OPTIMIZERS["sgd"])[1]
    seen = []
    optimizer = net.nodes[0].optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append([p for p in params if p.grad is not None]))
    net.train_step(*batch())
    assert [len(alive) for alive in seen] == [1] * len(params)
    assert {id(alive[0]) for alive in seen} == {id(p) for p in params}
    assert all(p.grad is None for p in params)


def test_hooked_networks_step_in_backward_too():
    torch.manual_seed(0)
    model = small_gpt()
    after, inside = (lp.localize(copy.deepcopy(model), nodes=3, hooks=True, optimizer=OPTIMIZERS["adam"],
                                 step_in_backward=s) for s in (False, True))
    assert_same_training(after, inside, inputs=tokens)


def test_a_parameter_of_several_nodes_steps_once_with_every_gradient():
    """A tied matrix (stepped by the last node using it) gets node 0's gradient and its
    own before its one step, as after the backward."""
    torch.manual_seed(0)
    model = Tied().double()
    ids, y = torch.randint(0, 7, (4, 3)), torch.randint(0, 7, (4, 3))
    after, inside = (lp.localize(copy.deepcopy(model), split_points=["block"], hooks=True,
                                 optimizer=OPTIMIZERS["sgd"], step_in_backward=s) for s in (False, True))
    assert_same_training(after, inside, inputs=lambda: (ids, y))


@pytest.mark.skipif(memory.cpu_counter() is None, reason="needs the C++ extension's counting allocator")
def test_the_peak_loses_all_but_one_layers_gradient():
    """Node 0 holds three layers of 512x512 (of the five, two nodes), batch 8: activations
    are small beside the 1 MiB weight gradients, of which it then holds one instead of
    three."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(512, 512), nn.ReLU())], nn.Linear(512, 3))
    x, y = torch.randn(8, 512), torch.randint(0, 3, (8,))
    sgd = functools.partial(torch.optim.SGD, lr=0.01)
    peaks = {s: memory.measure_step(lp.localize(copy.deepcopy(model), nodes=2, optimizer=sgd, step_in_backward=s,
                                                example_input=x), x, y).peak_bytes for s in (False, True)}
    weight_grad = 512 * 512 * 4
    assert peaks[False] >= 3 * weight_grad
    assert peaks[True] <= peaks[False] - 1.95 * weight_grad


def test_a_non_finite_update_is_still_caught():
    after, inside = pair("greedy", functools.partial(torch.optim.SGD, lr=float("inf")))
    with pytest.raises(FloatingPointError, match="node 0"):
        inside.train_step(*batch())


def test_clipping_and_whole_model_optimizers_are_refused():
    with pytest.raises(ValueError, match="max_grad_norm"):
        lp.localize(blocks(), step_in_backward=True, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="node 0.*LBFGS"):
        lp.localize(blocks(), step_in_backward=True, optimizer=torch.optim.LBFGS,
                    example_input=torch.randn(2, 7))
    with pytest.raises(ValueError, match="node 0.*LBFGS"):
        lp.localize(small_gpt(), nodes=2, hooks=True, step_in_backward=True,
                    optimizer=torch.optim.LBFGS).build(tokens()[0])
