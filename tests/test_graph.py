"""LocalGraph: build-time validation, inference, and training of multi-path, multi-goal graphs."""
import pytest
import torch

import localprop as lp
from localprop import data
from tests.conftest import SGD


def skip_graph(rule="locprop", dtype=torch.float32, backend=None):
    """x -> a -> b; out reads a and b (a skip path); aux reads a: two goals."""
    torch.manual_seed(0)
    g = lp.LocalGraph(rule=rule, optimizer=SGD, backend=backend)
    g.add("a", lp.LocalLinear(9, 16, dtype=dtype), "x")
    g.add("b", lp.LocalLinear(16, 12, activation="tanh", dtype=dtype), "a")
    g.add("out", lp.LocalLinear(28, 4, activation=None, dtype=dtype), ["a", "b"]).goal("out", target="y")
    g.add("aux", lp.LocalLinear(16, 4, activation=None, dtype=dtype), "a").goal("aux", target="y")
    return g


def batch(dtype=torch.float32, n=11):
    gen = torch.Generator().manual_seed(3)
    return {"x": torch.randn(n, 9, generator=gen, dtype=dtype)}, {"y": torch.randint(0, 4, (n,), generator=gen)}


def test_forward_returns_goal_outputs():
    g = skip_graph()
    out = g(batch()[0])
    assert set(out) == {"out", "aux"} and out["out"].shape == (11, 4)


def test_two_goal_skip_graph_trains_on_digits():
    split = data.digits()
    g = lp.LocalGraph(rule="locprop", optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    g.add("a", lp.LocalLinear(64, 96), "x").add("b", lp.LocalLinear(96, 96), "a")
    g.add("out", lp.LocalLinear(192, 10, activation=None), ["a", "b"]).goal("out", target="y")
    g.add("early", lp.LocalLinear(96, 10, activation=None), "a").goal("early", target="y")
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(4):
        for x, y in split.batches(64, gen):
            losses = g.train_step({"x": x}, {"y": y}).losses
            first = first or losses
    assert losses["out"] < first["out"] / 3 and losses["early"] < first["early"] / 2
    out = g({"x": split.x_test})
    for name in ("out", "early"):
        assert (out[name].argmax(1) == split.y_test).float().mean() > 0.9


def test_bp_on_a_graph_matches_autograd():
    g = skip_graph("bp", torch.float64)
    x, y = batch(torch.float64)
    params = {n: p.detach().clone().requires_grad_() for n, p in g.named_parameters()}
    out = g(x)  # same forward, by hand below
    w = lambda node: (params[f"graph_nodes.{node}.weight"], params[f"graph_nodes.{node}.bias"])
    a = torch.relu(x["x"] @ w("a")[0].T + w("a")[1])
    b = torch.tanh(a @ w("b")[0].T + w("b")[1])
    logits = torch.cat([a, b], 1) @ w("out")[0].T + w("out")[1]
    aux = a @ w("aux")[0].T + w("aux")[1]
    torch.testing.assert_close(out["out"], logits.detach())
    loss = torch.nn.functional.cross_entropy(logits, y["y"]) + torch.nn.functional.cross_entropy(aux, y["y"])
    grads = torch.autograd.grad(loss, list(params.values()))
    g.train_step(x, y)
    for (name, p), grad, before in zip(g.named_parameters(), grads, params.values()):
        # SGD(lr=0.1, momentum=0.9), first step: p - 0.1 grad
        torch.testing.assert_close(p, before.detach() - 0.1 * grad, rtol=1e-12, atol=1e-12, msg=name)


def graph_with(*edges, goals=("c",)):
    g = lp.LocalGraph(rule="locprop")
    for name, node, inputs in edges:
        g.add(name, node, inputs)
    for name in goals:
        g.goal(name, target="y")
    return g


def lin(i, o, act="relu"):
    return lp.LocalLinear(i, o, activation=act)


@pytest.mark.parametrize("build,match", [
    (lambda: graph_with(("a", lin(4, 4), ["x", "c"]), ("b", lin(4, 4), "a"), ("c", lin(4, 4), "b")),
     r"the graph has a cycle: a -> c -> b -> a|the graph has a cycle"),
    (lambda: graph_with(("a", lin(4, 8), "x"), ("c", lin(6, 3, None), "a")),
     r"node 'c': its inputs \['a'\] give 8 features, it expects 6"),
    (lambda: graph_with(("a", lin(4, 8), "x"), ("b", lin(8, 3), "a"), ("c", lin(8, 3, None), "a")),
     r"node 'b' is unused: no node reads it and it is no goal"),
    (lambda: graph_with(("a", lin(4, 3, None), "x"), goals=("zz",)),
     r"goal on missing node 'zz'"),
    (lambda: graph_with(("a", lin(4, 3, None), "x"), goals=()),
     r"the graph has no goal"),
])
def test_build_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build().build()


def test_input_errors():
    g = graph_with(("a", lin(4, 8), "x"), ("c", lin(8, 3, None), "a"))
    y = {"y": torch.zeros(5, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"unknown input 'x' \(read by node 'a'\)"):
        g.train_step({"z": torch.randn(5, 4)}, y)
    with pytest.raises(ValueError, match=r"unused input 'w': no node reads it"):
        g.train_step({"x": torch.randn(5, 4), "w": torch.randn(5, 4)}, y)
    with pytest.raises(ValueError, match=r"node 'a': its inputs \['x'\] give 5 features, it expects 4"):
        g.train_step({"x": torch.randn(5, 5)}, y)
    with pytest.raises(ValueError, match=r"goal 'c': target 'y' is missing"):
        g.train_step({"x": torch.randn(5, 4)}, {})
    with pytest.raises(ValueError, match=r"goal 'c': labels must lie in \[0, 3\), got \[0, 7\]"):
        g.train_step({"x": torch.randn(5, 4)}, {"y": torch.tensor([0, 1, 7, 2, 1])})
    with pytest.raises(TypeError, match=r"node 'a': input 'x' must be a floating-point tensor"):
        g.train_step({"x": torch.ones(5, 4, dtype=torch.long)}, y)


def test_construction_errors():
    g = lp.LocalGraph()
    g.add("a", lin(4, 3, None), "x")
    with pytest.raises(ValueError, match="node 'a' is defined twice"):
        g.add("a", lin(4, 3), "x")
    with pytest.raises(ValueError, match="loss must be one of cross_entropy, mse"):
        g.goal("a", target="y", loss="hinge")
    with pytest.raises(ValueError, match="rule 'greedy' trains chains only"):
        lp.LocalGraph(rule="greedy")


def test_mse_goal_trains():
    torch.manual_seed(0)
    g = lp.LocalGraph(rule="locprop", optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    g.add("a", lin(3, 16, "tanh"), "x").add("out", lin(16, 2, None), "a").goal("out", target="t", loss="mse")
    x = torch.randn(64, 3)
    t = torch.stack([x[:, 0] * x[:, 1], x[:, 2].sin()], 1)
    losses = [g.train_step({"x": x}, {"t": t}).losses["out"] for _ in range(300)]
    assert losses[-1] < 0.3 * losses[0]
