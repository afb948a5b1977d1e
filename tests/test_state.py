"""Exact resume from a checkpoint for every rule and backend, atomic writes, determinism."""
import functools

import pytest
import torch
from torch import nn

import localprop as lp
from localprop import checkpoint
from localprop.ops import backends
from localprop.rules import BLL, PGL, SGR, Critic, LocProp

CPU = torch.device("cpu")
BACKENDS = [b for b in backends.NAMES if backends.why_unavailable(b, CPU) is None]
ADAM = functools.partial(torch.optim.Adam, lr=1e-3)
RULES = {
    "bp": lambda: "bp", "bp+checkpoint": lambda: "bp+checkpoint", "greedy": lambda: "greedy",
    "sgr": lambda: SGR(), "sgr-fd": lambda: SGR(mode="finite_difference"), "critic": lambda: Critic(),
    "bll": lambda: BLL(), "pgl": lambda: PGL(period=2), "locprop": lambda: LocProp(),
    "locprop-decoupled": lambda: LocProp(mode="decoupled", propagation="feedback"),
    "locprop-inverse": lambda: LocProp(propagation="inverse"),
}


def batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 9, generator=gen), torch.randint(0, 4, (12,), generator=gen)) for _ in range(n)]


def mlp(rule, backend, seed):
    torch.manual_seed(seed)
    return lp.mlp([9, 16, 12, 4], rule=rule, optimizer=ADAM, backend=backend)


def cnn(rule, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(36, 4))
    return lp.localize(model, rule=rule, num_classes=4, optimizer=ADAM, example_input=torch.zeros(2, 1, 9))


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if key.endswith("_extra_state"):
            continue
        assert torch.equal(sa[key], sb[key]), key
    for oa, ob in zip(a.optimizers(), b.optimizers()):
        for pa, pb in zip(oa.state.values(), ob.state.values()):
            for k in pa:
                assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), k
    assert a.steps == b.steps


def resume_matches(make, data, tmp_path, reshape=lambda x: x):
    first, rest = data[:3], data[3:]
    run = make(0)
    for x, y in first:
        run.train_step(reshape(x), y)
    checkpoint.save(tmp_path / "ck.pt", run)
    for x, y in rest:
        run.train_step(reshape(x), y)
    resumed = make(1)  # other initial values: everything must come from the checkpoint
    if not resumed.built:
        resumed.build(reshape(data[0][0]))
    checkpoint.load(tmp_path / "ck.pt", resumed)
    for x, y in rest:
        resumed.train_step(reshape(x), y)
    state_equal(run, resumed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", list(RULES))
def test_fused_mlp_resumes_bit_for_bit(rule, backend, tmp_path):
    if backend == "triton" and rule not in ("greedy", "locprop"):
        pytest.skip("the Triton interpreter is slow: greedy and locprop cover its ops")
    resume_matches(lambda seed: mlp(RULES[rule](), backend, seed), batches(6), tmp_path)


@pytest.mark.parametrize("rule", ["bp", "greedy", "sgr", "critic", "bll", "pgl"])
def test_localized_cnn_resumes_bit_for_bit(rule, tmp_path):
    resume_matches(lambda seed: cnn(RULES[rule](), seed), batches(6), tmp_path, lambda x: x.unsqueeze(1))


def test_graph_resumes_bit_for_bit(tmp_path):
    def make(seed):
        torch.manual_seed(seed)
        g = lp.LocalGraph(rule=LocProp(propagation="feedback"), optimizer=ADAM)
        g.add("a", lp.LocalLinear(9, 16), "x").add("b", lp.LocalLinear(16, 8), "a")
        g.add("out", lp.LocalLinear(24, 4, activation=None), ["a", "b"]).goal("out", target="y")
        return g.build()
    data = [({"x": x}, {"y": y}) for x, y in batches(6)]
    run, resumed = make(0), make(1)
    for x, y in data[:3]:
        run.train_step(x, y)
    checkpoint.save(tmp_path / "g.pt", run)
    checkpoint.load(tmp_path / "g.pt", resumed)
    for x, y in data[3:]:
        run.train_step(x, y)
        resumed.train_step(x, y)
    state_equal(run, resumed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_result(backend):
    runs = []
    for _ in range(2):
        net = mlp("greedy", backend, seed=7)
        for x, y in batches(4):
            net.train_step(x, y)
        runs.append(net)
    state_equal(*runs)


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    net = mlp("greedy", "reference", 0)
    path = checkpoint.save(tmp_path / "ck.pt", net, epoch=1)
    before = path.read_bytes()
    x, y = batches(1)[0]
    net.train_step(x, y)

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, net, epoch=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind
    assert checkpoint.load(path, mlp("greedy", "reference", 1)) == {"epoch": 1}


def test_load_errors(tmp_path):
    net = mlp("greedy", "reference", 0)
    checkpoint.save(tmp_path / "ck.pt", net)
    with pytest.raises(RuntimeError, match="build the network before loading"):
        checkpoint.load(tmp_path / "ck.pt", lp.LocalSequential(nn.Linear(3, 4), num_classes=4))
    with pytest.raises(ValueError, match="the state has 3 optimizers, this network 5"):  # 3 nodes + 2 critics
        other = lp.mlp([9, 16, 12, 4], rule=Critic())
        state = net.state_dict()
        other.load_state_dict({k: v for k, v in state.items()} | {
            k: v for k, v in other.state_dict().items() if k not in state}, strict=False)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a localprop checkpoint"):
        checkpoint.load(tmp_path / "other.pt", net)


def test_a_head_built_otherwise_is_refused_naming_its_node():
    """A state saved with other heads (e.g. a linear head of a map, the former default)
    is refused before anything loads, naming the node and the parameter counts."""
    x = torch.randn(2, 1, 8, 8)

    def cnn(**kwargs):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                              nn.Flatten(), nn.Linear(4 * 64, 3))
        return lp.localize(model, num_classes=3, example_input=x, **kwargs)

    linear = lambda k, shape, size: nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(),  # noqa: E731
                                                  nn.Linear(4 * shape[0], size))
    saved, net = cnn(heads=linear).state_dict(), cnn()
    before = {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"node '0': the checkpoint's optimizer steps \[4\] parameters .* \[6\]"):
        net.load_state_dict(saved)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    cnn(heads=linear).load_state_dict(saved)  # built as it was saved, it loads
