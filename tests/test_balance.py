"""localize(balance=...): nodes balanced by parameters or by each block's measured step
memory, so that a high-resolution block does not set the step's peak alone."""
import sys

import pytest
import torch
from torch import nn

import localprop as lp
from localprop import memory
from localprop.localize import part_costs, units


def vgg(widths=(8, 8, 16, 16, 32, 32)):
    """Conv blocks; every second one halves the resolution, so early blocks hold the most
    activations and late ones the most parameters."""
    layers, c = [], 3
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU()] + ([nn.MaxPool2d(2)] if i % 2 else [])
        c = w
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 4 * 4, 10))


def node_sizes(net):
    return [len(units(list(n.block))) if isinstance(n.block, nn.Sequential) else 1 for n in net.nodes]


def test_params_balance_gives_late_blocks_their_own_nodes():
    torch.manual_seed(0)
    net = lp.localize(vgg(), num_classes=10, nodes=3, balance="params")
    assert node_sizes(net) == [5, 1, 1]  # the last conv and the classifier hold most parameters


@pytest.mark.skipif(memory.cpu_counter() is None, reason="needs the C++ extension's counting allocator")
def test_memory_balance_lowers_the_greedy_peak():
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    peaks, sizes = {}, {}
    for balance in ("count", "memory"):
        torch.manual_seed(0)
        net = lp.localize(vgg(), num_classes=10, nodes=3, balance=balance, example_input=x)
        sizes[balance] = node_sizes(net)
        peaks[balance] = memory.measure_step(net, x, y).peak_bytes
    assert sizes["count"] == [3, 2, 2]
    assert sizes["memory"][0] < sizes["count"][0]  # the full-resolution blocks get nodes of their own
    assert peaks["memory"] < peaks["count"]


@pytest.mark.skipif(memory.cpu_counter() is None, reason="needs the C++ extension's counting allocator")
def test_memory_costs_are_measured_without_changing_the_model():
    torch.manual_seed(0)
    model = vgg()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    costs = part_costs(units(list(model)), "memory", x)
    again = part_costs(units(list(model)), "memory", x)
    assert costs == again and costs[0] > costs[-1] > 0  # deterministic; early blocks hold more
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters()) and model.training


@pytest.mark.skipif(memory.cpu_counter() is None, reason="needs the C++ extension's counting allocator")
def test_a_parts_memory_counts_its_parameter_gradients():
    """A step starts without gradients, so a part's measured cost holds its two weights'
    gradients together by the end of its backward (1 MiB each, beside activations of a
    few KiB), not one at a time as an accumulation into existing gradients would."""
    part = [nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)]
    (cost,) = part_costs([part], "memory", torch.randn(2, 512))
    assert cost >= 2 * 512 * 512 * 4


@pytest.mark.skipif(memory.cpu_counter() is None, reason="needs the C++ extension's counting allocator")
def test_a_parts_memory_with_steps_in_the_backward_holds_one_gradient_at_a_time():
    """With step_in_backward the dry run frees each gradient once accumulated, as such a
    step does: the part of two 1 MiB weights holds one weight's gradient at a time."""
    torch.manual_seed(0)
    part = [nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)]
    x, grad = torch.randn(2, 512), 512 * 512 * 4
    (held,) = part_costs([part], "memory", x)
    (freed,) = part_costs([part], "memory", x, step_in_backward=True)
    assert grad <= freed < 2 * grad <= held
    assert all(p.grad is None for m in part for p in m.parameters())


@pytest.mark.parametrize("traced", [False, True])
def test_memory_balance_measures_as_the_step_will_run(traced, monkeypatch):
    """localize(balance="memory", step_in_backward=True) measures every dry run with the
    gradients freed as they arrive, on an nn.Sequential and on a traced model."""
    localize_module = sys.modules["localprop.localize"]  # the module, not lp.localize the function
    seen = []
    measure = localize_module._measure
    monkeypatch.setattr(localize_module, "_measure",
                        lambda block, u, balance, step_in_backward=False:
                        seen.append(step_in_backward) or measure(block, u, balance, step_in_backward))
    torch.manual_seed(0)
    model = lp.zoo.resnet18(width=4, classes=5) if traced else vgg()
    x = torch.randn(4, 3, 12, 12) if traced else torch.randn(4, 3, 32, 32)
    for step_in_backward in (False, True):
        seen.clear()
        lp.localize(model, num_classes=None if traced else 10, nodes=3, balance="memory", example_input=x,
                    step_in_backward=step_in_backward)
        assert seen and set(seen) == {step_in_backward}


def test_balance_errors():
    with pytest.raises(ValueError, match="balance must be one of count, params, memory, time"):
        lp.localize(vgg(), num_classes=10, nodes=2, balance="flops")
    with pytest.raises(ValueError, match="give example_input"):
        lp.localize(vgg(), num_classes=10, nodes=2, balance="memory")


def test_pools_start_units_when_asked():
    """units(pool_first=True): a pooling layer begins the next unit; a last unit left
    without parameters (a trailing pool) joins the one before."""
    layers = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(),
              nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    kinds = lambda parts: [[type(m).__name__ for m in part] for part in parts]  # noqa: E731
    assert kinds(units(layers)) == [["Conv2d"], ["BatchNorm2d", "ReLU", "MaxPool2d"],
                                    ["Conv2d", "ReLU", "AdaptiveAvgPool2d", "Flatten"]]
    assert kinds(units(layers, pool_first=True)) == [["Conv2d"], ["BatchNorm2d", "ReLU"],
                                                     ["MaxPool2d", "Conv2d", "ReLU", "AdaptiveAvgPool2d", "Flatten"]]


def bn_vgg(widths=(8, 8, 16, 16)):
    layers, c = [], 3
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()] + ([nn.MaxPool2d(2)] if i % 2 else [])
        c = w
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 4 * 4, 10))


class Counter(nn.Module):
    """Counts the forwards it sees in training mode in a buffer it replaces each time."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.seen = self.seen + 1
        return x


@pytest.mark.skipif(memory.cpu_counter() is None, reason="needs the C++ extension's counting allocator")
def test_memory_balance_leaves_running_statistics_and_gradients_alone():
    """The dry runs run in training mode (a step's memory) and put back what they change,
    buffers updated in place (BatchNorm's) and replaced (the counter's) alike."""
    torch.manual_seed(0)
    layers = list(bn_vgg())
    model = nn.Sequential(*layers[:3], Counter(), *layers[3:])
    model[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lp.localize(model, num_classes=10, nodes=3, balance="memory", example_input=torch.randn(8, 3, 16, 16))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters()) and model.training


@pytest.mark.skipif(memory.cpu_counter() is None, reason="needs the C++ extension's counting allocator")
def test_memory_balance_with_batchnorm_is_no_worse_than_count():
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    peaks = {}
    for balance in ("count", "memory"):
        torch.manual_seed(0)
        net = lp.localize(bn_vgg(), num_classes=10, nodes=4, balance=balance, example_input=x)
        peaks[balance] = memory.measure_step(net, x, y).peak_bytes
    assert peaks["memory"] <= peaks["count"]
