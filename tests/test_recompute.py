"""Activation checkpointing leaves a module's state as one forward leaves it: a
checkpointed step's BatchNorm statistics and spectral normalisation's power-iteration
vectors, and the parameters it trains, equal those of the same step without
checkpointing (torch.utils.checkpoint alone runs each forward twice a step)."""
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
    plain = assert_trained_alike(*nets, steps=2)
    assert int(plain["nodes.0.block.1.num_batches_tracked"]) == 2


def assert_trained_alike(plain, checkpointed, steps):
    """Trains both networks on the same batches; their buffers and parameters must agree
    to 1e-12 (float64). Returns the plain network's buffers."""
    for step in range(steps):
        x, y = batch(step)
        for net in (plain, checkpointed):
            net.train_step(x, y)
    expected, received = statistics(plain), statistics(checkpointed)
    assert received.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.allclose(value, received[name], rtol=0, atol=1e-12), name
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    return expected


def spectral_blocks():
    """Three blocks whose linear maps are spectrally normalised (torch.nn.utils.parametrizations):
    each forward in training mode runs a power iteration on the buffers _u and _v and
    divides the weight by the estimate, so a second forward would see another weight."""
    torch.manual_seed(0)
    sn = nn.utils.parametrizations.spectral_norm
    return [nn.Sequential(sn(nn.Linear(6, 8)), nn.Tanh()), nn.Sequential(sn(nn.Linear(8, 8)), nn.Tanh()),
            nn.Sequential(sn(nn.Linear(8, 3)))]


@pytest.mark.parametrize("segment", [1, 2])
def test_bp_with_checkpointing_runs_spectral_normalisation_once_a_step(segment):
    nets = [lp.LocalSequential(*spectral_blocks(), rule=rule).double()
            for rule in (BP(), BP(checkpoint=True, segment=segment))]
    assert any(name.endswith("._u") for name in assert_trained_alike(*nets, steps=3))


class Monitor(nn.Module):
    """Running statistics of what passes, kept off the autograd graph: its forward saves
    nothing for the backward, so a recomputation that stops early never reaches it."""

    def __init__(self, features):
        super().__init__()
        self.bn = nn.BatchNorm1d(features, affine=False)

    def forward(self, x):
        self.bn(x.detach())
        return x


def test_a_recomputation_stopped_early_still_restores_the_statistics():
    """torch.utils.checkpoint stops recomputing once the tensors the backward needs exist
    (it raises through the recomputation's context), here before the last module: the
    statistics are restored then too (those that the recomputation did not reach
    included), and the gradients are those of the forward without checkpointing."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4), nn.BatchNorm1d(4),
                        Monitor(4)).double()
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


class SpectralBlock(nn.Module):
    """A residual block of two spectrally normalised linear maps."""

    def __init__(self, width):
        super().__init__()
        self.a = nn.utils.parametrizations.spectral_norm(nn.Linear(width, width))
        self.b = nn.utils.parametrizations.spectral_norm(nn.Linear(width, width))

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(x)))


class SpectralModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.layers = nn.Sequential(*[SpectralBlock(8) for _ in range(4)])
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)))


# 2 nodes: blocks checkpointed whole inside a node; 4: a node of one block recomputes its first half
@pytest.mark.parametrize("nodes", [2, 4])
def test_localize_with_checkpointing_runs_spectral_normalisation_once_a_step(nodes):
    def built(checkpoint):  # heads built here from the example, on the same random draws
        torch.manual_seed(0)
        return lp.localize(SpectralModel().double(), "greedy", nodes=nodes, checkpoint=checkpoint,
                           example_input=batch(0)[0])

    assert_trained_alike(built(False), built(True), steps=3)


class Decaying(nn.Module):
    """Scales by a buffer that its forward in training mode replaces (not updates in place)
    by half of itself, so a second forward would see, and leave, another scale."""

    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.register_buffer("scale", torch.ones(width))

    def forward(self, x):
        out = self.linear(x) * self.scale
        if self.training:
            self.scale = self.scale * 0.5
        return torch.tanh(out)


class Counting(nn.Module):
    """Registers a buffer on its first forward in training mode (a lazily made cache) and
    then replaces it: a recomputation that saw the registered buffer would scale by more."""

    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        if not self.training:
            return torch.tanh(self.linear(x))
        if "count" not in self._buffers:
            self.register_buffer("count", torch.zeros((), dtype=x.dtype), persistent=False)
        out = self.linear(x) * (1 + self.count)
        self.count = self.count + 1
        return torch.tanh(out)


class Warming(nn.Module):
    """Scales by 3 while a buffer slot is None (its first forward in training mode), then
    fills the slot: a recomputation that saw the filled slot would not scale."""

    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.register_buffer("warm", None)

    def forward(self, x):
        out = self.linear(x)
        if self.training and self.warm is None:
            out = out * 3
            self.warm = torch.ones((), dtype=x.dtype)
        return torch.tanh(out)


@pytest.mark.parametrize("segment", [1, 2])
@pytest.mark.parametrize("kind", [Decaying, Counting, Warming])
def test_bp_with_checkpointing_undoes_what_a_forward_does_to_buffer_slots(kind, segment):
    """A forward that replaces a buffer (Decaying), registers one (Counting) or fills a
    slot that held None (Warming): the recomputation sees the slots as the forward saw them,
    and the step leaves them as one forward does."""
    def built(rule):
        torch.manual_seed(0)
        return lp.LocalSequential(nn.Linear(6, 8), kind(8), kind(8), nn.Linear(8, 3), rule=rule).double()

    nets = built(BP()), built(BP(checkpoint=True, segment=segment))
    plain = assert_trained_alike(*nets, steps=2)
    if kind is Decaying:
        assert torch.equal(plain["nodes.1.block.scale"], torch.full((8,), 0.25, dtype=torch.float64))
    elif kind is Counting:
        assert float(plain["nodes.1.block.count"]) == 2 and "count" not in nets[1].nodes[1].block.state_dict()
    else:
        assert float(plain["nodes.1.block.warm"]) == 1
