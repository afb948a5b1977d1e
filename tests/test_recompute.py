"""Activation checkpointing leaves running statistics as one forward leaves them: a
checkpointed step's BatchNorm buffers equal those of the same step without checkpointing
(torch.utils.checkpoint alone runs each BatchNorm's forward twice a step)."""
import pytest
import torch
from torch import nn

import localprop as lp
from localprop.recompute import recomputed
from localprop.rules import BP


def blocks(momentum):
    """Four blocks with a BatchNorm each, 6 features in, 3 classes out; the same every call."""
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(6 if i == 0 else 8, 8), nn.BatchNorm1d(8, momentum=momentum), nn.ReLU())
            for i in range(3)] + [nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8, momentum=momentum), nn.Linear(8, 3))]


def statistics(net):
    return {name: b.clone() for name, b in net.named_buffers()}


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g)


@pytest.mark.parametrize("momentum", [0.1, None])  # None: the cumulative average over num_batches_tracked
@pytest.mark.parametrize("segment", [1, 2])
def test_bp_with_checkpointing_updates_running_statistics_once_a_step(momentum, segment):
    nets = [lp.LocalSequential(*blocks(momentum), rule=rule).double()
            for rule in (BP(), BP(checkpoint=True, segment=segment))]
    for step in range(2):
        x, y = batch(step)
        for net in nets:
            net.train_step(x, y)
    plain, checkpointed = (statistics(n) for n in nets)
    assert int(plain["nodes.0.block.1.num_batches_tracked"]) == 2
    for name, value in plain.items():
        assert torch.allclose(value, checkpointed[name], rtol=0, atol=1e-12), name
    for a, b in zip(*(n.parameters() for n in nets)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_a_recomputation_stopped_early_still_restores_the_statistics():
    """torch.utils.checkpoint stops recomputing once the tensors the backward needs exist
    (it raises through the recomputation's context): the statistics are restored then too,
    and the gradients are those of the forward without checkpointing."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4), nn.BatchNorm1d(4)).double()
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    reference = {k: v.clone() for k, v in mlp.state_dict().items()}
    mlp(x).sum().backward()  # one plain step: the statistics to expect
    expected = {k: v.clone() for k, v in mlp.state_dict().items()}
    grad = x.grad.clone()
    mlp.load_state_dict(reference)
    x.grad = None
    with torch.utils.checkpoint.set_checkpoint_early_stop(True):
        recomputed(mlp, x, modules=mlp.modules()).sum().backward()
    for name, value in mlp.state_dict().items():
        assert torch.allclose(value, expected[name], rtol=0, atol=1e-12), name
    assert torch.allclose(x.grad, grad, rtol=0, atol=1e-12)


def test_without_autograd_the_forward_runs_once_as_it_is():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3).double()
    with torch.no_grad():
        recomputed(bn, torch.randn(5, 3, dtype=torch.float64), modules=bn.modules())
    assert int(bn.num_batches_tracked) == 1
