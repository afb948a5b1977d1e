"""The one node protocol (Node.local_step): a fused LocalLinear's BP-free step equals its
autograd step for every objective, and the chain rules use it only (no node-kind tests, no ops)."""
import copy
import functools
import inspect

import pytest
import torch
import torch.nn.functional as F

import localprop as lp
from localprop import rules
from localprop.nodes import InputGradPenalty

SGD = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)


def fused_node(activation="tanh", head=True):
    """Node 0 of a built 2-node float64 net (with a linear head) or its last node (without)."""
    torch.manual_seed(0)
    net = lp.LocalSequential(lp.LocalLinear(6, 5, activation, dtype=torch.float64),
                             lp.LocalLinear(5, 3, None, dtype=torch.float64),
                             rule="greedy", num_classes=3, optimizer=SGD, backend="reference")
    net.build(torch.zeros(2, 6, dtype=torch.float64))
    return net.nodes[0 if head else 1]


def batch(k=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(7, k, generator=gen, dtype=torch.float64), torch.randint(0, 3, (7,), generator=gen)


def objectives(y):
    g = torch.randn(7, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return {
        "labels": dict(labels=y, per_sample=True),
        "loss": dict(loss=lambda h, head: F.cross_entropy(head(h), y) + h.pow(2).mean()),
        "per_sample_loss": dict(loss=lambda h, head: F.cross_entropy(head(h), y, reduction="none"),
                                train_head=False),
        "grad": dict(grad=g),
    }


@pytest.mark.parametrize("objective", ["labels", "loss", "per_sample_loss", "grad"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_fused_step_equals_autograd_step(objective, activation):
    u, y = batch()
    fused = fused_node(activation)
    ref = copy.deepcopy(fused)
    ref.optimizer = SGD(ref.parameters())  # the deep copy's own optimizer, over its own parameters
    kw = objectives(y)[objective]
    a = fused.local_step(u.clone(), 0, input_grad=True, output_grad=True,
                         **{k: v.clone() if torch.is_tensor(v) else v for k, v in kw.items()})
    b = ref.local_step(u.clone(), 0, input_grad=True, output_grad=True, autograd=True, **kw)
    for name in ("h", "loss", "input_grad", "output_grad", "per_sample"):
        x, z = getattr(a, name), getattr(b, name)
        assert (x is None) == (z is None), name
        if x is not None:
            assert not x.requires_grad and not z.requires_grad, name
            torch.testing.assert_close(x, z, msg=name)
    for (n, p), q in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=n)


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_input_grad_penalty_fused_and_autograd_agree(method):
    u, y = batch()
    target = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    penalty = InputGradPenalty(lambda g: (g - target).pow(2).sum(), lambda g: 2 * (g - target), method, eps=1e-6)
    fused = fused_node()
    ref = copy.deepcopy(fused)
    ref.optimizer = SGD(ref.parameters())
    a = fused.local_step(u.clone(), 0, labels=y, input_grad=True, penalty=penalty)
    b = ref.local_step(u.clone(), 0, labels=y, input_grad=True, penalty=penalty, autograd=True)
    torch.testing.assert_close(a.input_grad, b.input_grad)
    for p, q in zip(fused.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


def test_one_objective_is_required():
    u, y = batch()
    node = fused_node()
    with pytest.raises(TypeError, match="exactly one objective"):
        node.local_step(u, 0)
    with pytest.raises(TypeError, match="exactly one objective"):
        node.local_step(u, 0, labels=y, grad=torch.zeros(7, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="labels"):
        node.local_step(u, 0, loss=lambda h, head: h.sum(), penalty=InputGradPenalty(None, None))


@pytest.mark.parametrize("rule", [rules.Greedy, rules.SGR, rules.Critic, rules.BLL, rules.PGL])
def test_chain_rules_use_only_the_node_protocol(rule):
    source = inspect.getsource(inspect.getmodule(rule))
    assert ".fused" not in source and "import ops" not in source and "ops." not in source
    if rule is not rules.PGL:
        assert issubclass(rule, rules.LocalRule) and "def train_step" not in source
