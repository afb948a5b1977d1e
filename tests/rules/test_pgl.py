"""PGL: the schedule (one global step per period), the global step is bp, the local
rule's state is delegated, and checkpointed global steps keep the peak memory near the
local rule's."""
import torch
from torch import nn

import localprop as lp
from localprop import memory
from tests.conftest import SGD, mlp_nodes
from tests.rules.conftest import updates


def test_exactly_one_global_step_per_period(batch):
    x, y = batch
    net = lp.LocalSequential(*mlp_nodes([9, 16, 16, 5]), rule=lp.rules.PGL(period=3), num_classes=5, optimizer=SGD)
    flags = [net.train_step(x, y).extra["global"] for _ in range(10)]
    assert flags == [False, False, True] * 3 + [False]


def test_global_step_is_bp_and_local_step_is_the_local_rule(batch):
    x, y = batch

    def make(rule):
        return lp.LocalSequential(*mlp_nodes([9, 16, 16, 5], torch.float64), rule=rule, num_classes=5, optimizer=SGD)

    x = x.double()
    torch.testing.assert_close(updates(make, lp.rules.PGL(period=1), x, y, nodes_only=True),
                               updates(make, "bp", x, y, nodes_only=True))
    torch.testing.assert_close(updates(make, lp.rules.PGL(local="sgr", period=2), x, y), updates(make, "sgr", x, y))


def test_local_rule_state_is_delegated(batch):
    x, y = batch
    net = lp.LocalSequential(*mlp_nodes([9, 16, 16, 5]), rule=lp.rules.PGL(local="critic", period=2),
                             num_classes=5, optimizer=SGD)
    critics = {id(p) for node in net.nodes[:-1] for p in node.head.parameters()}
    assert isinstance(net.nodes[0].head, nn.Sequential) and len(net.rule_state.optimizers) == 2
    assert not critics & {id(p) for node in net.nodes for g in node.optimizer.param_groups for p in g["params"]}
    assert "critic_gap" in net.train_step(x, y).extra and net.train_step(x, y).extra["global"]


def ffn_mlp() -> nn.Sequential:
    """A deep MLP of 8 FFN blocks (64 -> 512 -> 64, 17 Linear layers in all)."""
    layers = [nn.Linear(32, 64), nn.ReLU()]
    for _ in range(8):
        layers += [nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 64), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


def peak(rule, x, y, steps) -> int:
    torch.manual_seed(0)
    net = lp.localize(ffn_mlp(), rule=rule, num_classes=10, nodes=4, example_input=x)
    net.train_step(x, y)  # optimizer state exists: resident, not part of a step's peak
    return max(memory.measure_step(net, x, y, warmup=0).peak_bytes for _ in range(steps))


def test_checkpointed_global_steps_stay_near_the_local_peak():
    """4 nodes of 2 FFN blocks each; global steps checkpoint one node per segment
    (segment=1). Their backward then recomputes one node at a time, whose working set is
    the local step's, and only adds the 4 saved node inputs (64 wide, against the 512-wide
    hidden activations inside a node) and the parameter gradients of the whole net before
    the optimizer steps. Measured: 1.14x greedy's peak; plain bp is 2.0x and the default
    ceil(sqrt(K)) segments 1.5x. With more nodes than layers per node (e.g. 8 nodes of one
    block) the saved inputs dominate and even segment=1 reaches ~1.9x."""
    x, y = torch.randn(512, 32), torch.randint(0, 10, (512,))
    local = peak("greedy", x, y, 1)
    with_global = peak(lp.rules.PGL(period=2, segment=1), x, y, 2)  # one local and one global step
    assert with_global <= 1.2 * local
    assert peak("bp", x, y, 1) > 1.5 * local  # what the checkpointing saves
