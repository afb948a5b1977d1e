"""Bad input gets a clear error naming the node, the expected and the received, and
changes nothing."""
import pytest
import torch
from torch import nn

import localprop as lp
from localprop.nodes import ModuleNode
from tests.conftest import SGD, mlp_nodes


@pytest.fixture
def net():
    return lp.LocalSequential(*mlp_nodes([9, 16, 5]), rule="greedy", num_classes=5, optimizer=SGD)


def snapshot(net):
    return [p.clone() for p in net.parameters()]


def unchanged(net, before):
    return all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.parametrize("x,y,error,match", [
    (torch.randn(4, 8), torch.zeros(4, dtype=torch.long), ValueError, r"node 0: expected x of shape \[B, 9\], got \[4, 8\]"),
    (torch.randn(4, 9), torch.zeros(3, dtype=torch.long), ValueError, r"batch of 4, y has shape \[3\]"),
    (torch.randn(4, 9), torch.tensor([0, 1, 5, 2]), ValueError, r"labels must lie in \[0, 5\), got values in \[0, 5\]"),
    (torch.randn(4, 9), torch.tensor([0, -1, 2, 2]), ValueError, r"got values in \[-1, 2\]"),
    (torch.randn(0, 9), torch.zeros(0, dtype=torch.long), ValueError, r"node 0: empty batch"),
    (torch.ones(4, 9, dtype=torch.long), torch.zeros(4, dtype=torch.long), TypeError, r"node 0: x must be a floating-point tensor, got torch.int64"),
    (torch.randn(4, 9), torch.zeros(4), TypeError, r"labels y must be an integer tensor \(int64, int32, int16, int8 "
                                                   r"or uint8\), got torch.float32"),
])
def test_bad_batches(net, x, y, error, match):
    before = snapshot(net)
    with pytest.raises(error, match=match):
        net.train_step(x, y)
    assert unchanged(net, before) and net.steps == 0


@pytest.mark.parametrize("x,error,match", [
    (torch.empty(4, 9, device="meta"), ValueError, r"node 0: x is on meta, the node's parameters on cpu"),
    (torch.randn(4, 9, dtype=torch.float64), TypeError, r"node 0: x is torch.float64, the node's parameters are torch.float32"),
])
def test_wrong_device_or_dtype(net, x, error, match):
    with pytest.raises(error, match=match):
        net.train_step(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels y are on meta, x on cpu"):
        net.train_step(torch.randn(4, 9), torch.zeros(4, dtype=torch.long, device="meta"))


def test_non_finite_input_raises_before_any_change(net):
    x = torch.randn(4, 9)
    x[2, 3] = float("nan")
    before = snapshot(net)
    with pytest.raises(FloatingPointError, match=r"node 0: non-finite input x at step 0"):
        net.train_step(x, torch.zeros(4, dtype=torch.long))
    assert unchanged(net, before)


@pytest.mark.parametrize("rule", ["greedy", "bp"])
def test_non_finite_loss_names_node_and_step_and_changes_nothing(rule):
    net = lp.LocalSequential(*mlp_nodes([9, 16, 5]), rule=rule, num_classes=5, optimizer=SGD)
    x, y = torch.ones(4, 9), torch.zeros(4, dtype=torch.long)  # x > 0: the inf weight reaches the loss
    net.train_step(x, y)
    with torch.no_grad():
        net.nodes[0].weight[0, 0] = float("inf")
    before = snapshot(net)
    with pytest.raises(FloatingPointError, match=r"node 0: non-finite loss at step 1" if rule == "greedy"
                       else r"node 1: non-finite loss at step 1"):
        net.train_step(x, y)
    assert all(torch.equal(a, b) if not a.isnan().any() else torch.allclose(a, b, equal_nan=True)
               for a, b in zip(before, net.parameters()))


INFERENCE = {
    "forward": lambda net, x: net(x),
    "predict": lambda net, x: net.predict(x),
    "predict-exit": lambda net, x: net.predict(x, exit_threshold=0.5),
    "predict-ensemble": lambda net, x: net.predict(x, ensemble=True),
}


def nan_batch():
    x = torch.randn(4, 9)
    x[1, 2] = float("nan")
    return x


@pytest.mark.parametrize("call", list(INFERENCE))
@pytest.mark.parametrize("make_x,error,match", [
    (lambda: torch.randn(4, 8), ValueError, r"node 0: expected x of shape \[B, 9\], got \[4, 8\]"),
    (nan_batch, FloatingPointError, r"node 0: non-finite input x at step 0"),
    (lambda: torch.randn(0, 9), ValueError, r"node 0: empty batch \(x has shape \[0, 9\]\)"),
    (lambda: torch.ones(4, 9, dtype=torch.long), TypeError,
     r"node 0: x must be a floating-point tensor, got torch.int64"),
    (lambda: torch.randn(4, 9, dtype=torch.float64), TypeError, r"node 0: x is torch.float64, the node's parameters"),
], ids=["width", "nan", "empty", "int", "float64"])
def test_inference_validates_x_as_training_does(net, call, make_x, error, match):
    with pytest.raises(error, match=match):
        INFERENCE[call](net, make_x())


def test_inference_of_non_finite_x_is_allowed_with_check_finite_off():
    net = lp.LocalSequential(*mlp_nodes([9, 16, 5]), num_classes=5, check_finite=False)
    assert net(nan_batch()).isnan().any()


def test_a_module_network_validates_x_once_built():
    net = lp.LocalSequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 5), num_classes=5)
    net(torch.randn(4, 9))  # builds: node 0 now knows its input shape
    with pytest.raises(ValueError, match=r"node 0: expected x of shape \[B, 9\], got \[4, 8\]"):
        net.predict(torch.randn(4, 8))


@pytest.mark.parametrize("make,match", [
    (lambda a, b: [a, b, a], r"node 2 is the same module as node 0"),
    (lambda a, b: [nn.Sequential(a.block, nn.ReLU()), nn.Sequential(a.block), b],
     r"nodes 0 and 1 share the parameter '0.weight'"),
    (lambda a, b: [a, ModuleNode(a.block), b], r"nodes 0 and 1 share the parameter 'block.weight'"),
], ids=["same-node", "shared-block", "shared-wrapped-block"])
def test_a_node_given_twice_is_refused(make, match):
    a, b = ModuleNode(nn.Linear(5, 5)), nn.Linear(5, 3)
    with pytest.raises(ValueError, match=match):
        lp.LocalSequential(*make(a, b), num_classes=3)


def test_a_fused_node_given_twice_is_refused():
    a = lp.LocalLinear(5, 5)
    with pytest.raises(ValueError, match=r"node 1 is the same module as node 0"):
        lp.LocalSequential(a, a, lp.LocalLinear(5, 3, activation=None), num_classes=3)


@pytest.mark.parametrize("second,match", [
    (lambda a: a, r"node 'b' is the same module as node 'a'"),
    (lambda a: ModuleNode(a.block), r"nodes 'a' and 'b' share the parameter 'block.weight'"),
], ids=["same-node", "shared-block"])
def test_a_graph_refuses_a_node_added_twice(second, match):
    g = lp.LocalGraph(rule="bp")
    a = ModuleNode(nn.Linear(5, 5))
    g.add("a", a, inputs="x")
    with pytest.raises(ValueError, match=match):
        g.add("b", second(a), inputs="a")
    assert list(g.graph_nodes) == ["a"]


def test_shape_mismatch_between_nodes():
    with pytest.raises(ValueError, match=r"node 1: expects inputs of shape \[8\], but node 0 outputs \[16\]"):
        lp.LocalSequential(lp.LocalLinear(9, 16), lp.LocalLinear(8, 5), num_classes=5)


def test_last_node_must_output_logits():
    with pytest.raises(ValueError, match=r"node 1: the last node must output the logits, shape \[3\]"):
        lp.LocalSequential(lp.LocalLinear(9, 16), lp.LocalLinear(16, 5), num_classes=3)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"rule": "nope"}, ValueError, "unknown rule 'nope'"),
    ({"backend": "fortran"}, ValueError, "unknown backend 'fortran'"),
    ({"num_classes": 1}, ValueError, "num_classes must be an int >= 2"),
])
def test_bad_arguments(kwargs, error, match):
    args = {"rule": "greedy", "num_classes": 5, **kwargs}
    with pytest.raises(error, match=match):
        lp.LocalSequential(*mlp_nodes([9, 16, 5]), **args)


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        lp.LocalLinear(3, 4, activation="swish")


def test_absent_backend_is_an_error_that_says_how(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    net = lp.LocalSequential(*mlp_nodes([9, 16, 5]), num_classes=5, backend="cuda")
    with pytest.raises(lp.BackendUnavailable, match="backend 'cuda' is not available: the cuda backend runs on CUDA"):
        net.train_step(torch.randn(4, 9), torch.zeros(4, dtype=torch.long))


def test_env_var_sets_default_backend(monkeypatch):
    monkeypatch.setenv("LOCALPROP_BACKEND", "reference")
    net = lp.LocalSequential(*mlp_nodes([9, 16, 5]), num_classes=5)
    assert net.backend == "reference"
