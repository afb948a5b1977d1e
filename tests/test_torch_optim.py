"""Fused nodes as a drop-in for nn.Linear + torch.optim: the fused update runs through
optimizer.step(), so hooks, lr schedulers, state_dict and step counters behave as on the
autograd path (ModuleNode around nn.Linear + activation)."""
import copy
import functools
import warnings

import pytest
import torch
from torch import nn

import localprop as lp
from localprop import ops
from localprop.ops.update import grad_norm_sq

F64 = torch.float64
SGD, Adam, AdamW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW
OPTIMIZERS = {
    "sgd-momentum+wd": functools.partial(SGD, lr=0.1, momentum=0.9, weight_decay=0.01),
    "nesterov+wd": functools.partial(SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": functools.partial(Adam, lr=0.01),
    "adamw": functools.partial(AdamW, lr=0.01, weight_decay=0.1),
}
#: (in, out, activation) of each node; 4 classes
LAYERS = [(9, 16, "relu"), (16, 12, "tanh"), (12, 4, None)]
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
STEPS = 6


def batches(n=STEPS, dtype=F64):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(11, 9, generator=gen, dtype=dtype), torch.randint(0, 4, (11,), generator=gen))
            for _ in range(n)]


def fused_net(make, backend):
    nodes = [lp.LocalLinear(i, o, activation=a, dtype=F64) for i, o, a in LAYERS]
    return lp.LocalSequential(*nodes, rule="greedy", num_classes=4, optimizer=make, backend=backend)


def autograd_net(like, make):
    """The same network as ``like`` (a fused one) with nn.Linear + activation blocks,
    trained through autograd and optimizer.step(); its parameters copied from ``like``."""
    blocks = [nn.Sequential(nn.Linear(i, o, dtype=F64), *([ACTIVATIONS[a]()] if a else [])) for i, o, a in LAYERS]
    net = lp.LocalSequential(*blocks, rule="greedy", num_classes=4, optimizer=make).build(batches(1)[0][0])
    with torch.no_grad():
        for fused, node in zip(like.nodes, net.nodes):
            node.block[0].weight.copy_(fused.weight)
            node.block[0].bias.copy_(fused.bias)
            if fused.head is not None:
                node.head.load_state_dict(fused.head.state_dict())
    return net


def train(net):
    """The user's loop: hooks and a cosine schedule on every optimizer, STEPS steps.
    Returns the hook calls, (kind, optimizer index, the first parameter's sum as the hook
    sees it), and the warnings raised."""
    calls = []
    for k, opt in enumerate(net.optimizers()):
        for kind, register in (("pre", opt.register_step_pre_hook), ("post", opt.register_step_post_hook)):
            register(functools.partial(_record, calls, kind, k))
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS) for opt in net.optimizers()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches():
            net.train_step(x, y)
            for scheduler in schedulers:
                scheduler.step()
    return calls, [str(w.message) for w in caught]


def _record(calls, kind, k, opt, args, kwargs):
    calls.append((kind, k, float(opt.param_groups[0]["params"][0].detach().sum())))


def node_tensors(net):
    """Per node: W, b, and the head's parameters, whatever the node's kind."""
    out = []
    for node in net.nodes:
        lin = node if isinstance(node, lp.LocalLinear) else node.block[0]
        out += [lin.weight, lin.bias] + ([] if node.head is None else list(node.head.parameters()))
    return out


def assert_state_close(got, want):
    """Two optimizer.state_dict()s: the same keys, types, counters and hyperparameters,
    tensors within 1e-12."""
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for index, state in want["state"].items():
        assert got["state"][index].keys() == state.keys(), index
        for key, value in state.items():
            mine = got["state"][index][key]
            assert (type(mine), mine.dtype, mine.shape) == (type(value), value.dtype, value.shape), (index, key)
            torch.testing.assert_close(mine, value, rtol=1e-12, atol=1e-12, msg=f"state {index} {key}")


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_loop_matches_autograd_loop(backend, name):
    """Hooks, a scheduler and state: the fused nodes' loop as the autograd loop."""
    make = OPTIMIZERS[name]
    fused = fused_net(make, backend)
    reference = autograd_net(fused, make)
    (got_calls, got_warnings), (want_calls, want_warnings) = train(fused), train(reference)
    # torch warns when a scheduler steps before its optimizer: neither loop may
    order = [[w for w in ws if "lr_scheduler" in w or "optimizer.step" in w] for ws in (got_warnings, want_warnings)]
    assert order == [[], []], order
    assert [c[:2] for c in got_calls] == [c[:2] for c in want_calls]
    assert len(got_calls) == 2 * STEPS * len(LAYERS)
    assert [c[2] for c in got_calls] == pytest.approx([c[2] for c in want_calls], rel=1e-12, abs=1e-12)
    for p, q in zip(node_tensors(fused), node_tensors(reference), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    for opt, ref_opt in zip(fused.optimizers(), reference.optimizers(), strict=True):
        assert_state_close(opt.state_dict(), ref_opt.state_dict())
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-15)


def test_a_step_that_drops_its_closure_is_an_error():
    """A pre-hook that replaces step()'s arguments drops the closure the fused update runs in."""
    net = fused_net(OPTIMIZERS["adam"], "cpp")
    net.optimizers()[0].register_step_pre_hook(lambda opt, args, kwargs: ((opt,), {}))
    x, y = batches(1)[0]
    with pytest.raises(RuntimeError, match="closure"):
        net.train_step(x, y)


def test_a_stale_grad_is_an_error_not_a_second_step():
    w = nn.Parameter(torch.randn(3, 2, dtype=F64))
    opt = SGD([w], lr=0.1)
    w.grad = torch.ones_like(w)
    with pytest.raises(RuntimeError, match=r"\[3, 2\] holds a .grad"), torch.no_grad():
        ops.update(opt, [ops.LinearGrad(w, None, torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64))],
                   backend="cpp")


# ---- small items --------------------------------------------------------------------------

@pytest.mark.parametrize("given, what", [(lambda: Adam([nn.Parameter(torch.zeros(1))]), "an optimizer instance"),
                                         (lambda: 0.1, "not callable")])
def test_an_optimizer_instance_is_refused_with_an_example(given, what):
    with pytest.raises(TypeError, match=rf"factory params -> torch.optim.Optimizer.*{what}.*functools.partial"):
        lp.mlp([4, 8, 3], optimizer=given())


def test_train_and_eval_switch_the_users_modules():
    """The user's modules the nodes came from (a root and containers outside the nodes)."""
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 3))
    net = lp.LocalSequential(*model, num_classes=3).build(torch.randn(2, 4))
    net._user_modules = (model,)
    for mode in (False, True):
        net.train(mode)
        assert {m.training for m in [*model.modules(), *net.modules()]} == {mode}


def test_step_result_shows_its_keys_as_they_are():
    result = fused_net(OPTIMIZERS["adam"], "cpp").train_step(*batches(1)[0])
    assert list(result.losses) == ["0", "1", "2"]
    assert "losses={'0': " in repr(result)
    assert result.losses["0"] == pytest.approx(float(repr(result).split("'0': ")[1].split(",")[0]), rel=1e-3)


# ---- moves: net.to(dtype / device) takes the optimizers' state along -----------------------

def snapshot(net):
    """A deep copy of the network's state_dict (parameters, steps, optimizers' state)."""
    return copy.deepcopy(net.state_dict())


def make_fused(make, backend, dtype):
    torch.manual_seed(0)
    nodes = [lp.LocalLinear(i, o, activation=a, dtype=dtype) for i, o, a in LAYERS]
    return lp.LocalSequential(*nodes, rule="greedy", num_classes=4, optimizer=make, backend=backend)


def optimizer_tensors(net):
    return [(key, value) for opt in net.optimizers() for state in opt.state.values() for key, value in state.items()]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("name", ["sgd-momentum+wd", "adam", "adamw"])
def test_to_dtype_after_training_moves_the_optimizer_state(backend, name):
    """Float32 training, net.to(float64), more training: the same as loading the float32
    state into a float64 network (torch.optim's own placement of a loaded state)."""
    make = OPTIMIZERS[name]
    data = batches(4)
    net = make_fused(make, backend, torch.float32)
    for x, y in data[:2]:
        net.train_step(x.float(), y)
    saved, steps = snapshot(net), [v.clone() for k, v in optimizer_tensors(net) if k == "step"]
    net.to(torch.float64)
    for key, value in optimizer_tensors(net):
        assert value.dtype == (torch.float32 if key == "step" else torch.float64), key
    assert [v for k, v in optimizer_tensors(net) if k == "step"] == steps  # step counters as they were
    loaded = make_fused(make, backend, torch.float64)
    loaded.load_state_dict(saved)
    for x, y in data[2:]:
        assert net.train_step(x, y).losses == loaded.train_step(x, y).losses
    for p, q in zip(net.parameters(), loaded.parameters(), strict=True):
        assert p.dtype == torch.float64 and torch.equal(p, q)
    for (k, v), (k2, v2) in zip(optimizer_tensors(net), optimizer_tensors(loaded), strict=True):
        assert k == k2 and v.dtype == v2.dtype and torch.equal(v, v2), k


def test_to_dtype_with_new_parameters_keeps_the_optimizers_on_them(monkeypatch):
    """Conversions that make new Parameters: the optimizers step the new ones."""
    monkeypatch.setattr(torch.__future__, "_overwrite_module_params_on_conversion", True)
    net = make_fused(OPTIMIZERS["sgd-momentum+wd"], "cpp", torch.float32)
    x, y = batches(1)[0]
    net.train_step(x.float(), y)
    old = list(net.parameters())
    net.to(torch.float64)
    assert not any(p is q for p, q in zip(old, net.parameters()))
    mine = {id(p) for p in net.parameters()}
    assert {id(p) for opt in net.optimizers() for g in opt.param_groups for p in g["params"]} == mine
    assert {id(p) for opt in net.optimizers() for p in opt.state} == mine
    before = [p.clone() for p in net.parameters()]
    net.train_step(x, y)
    assert all(not torch.equal(p, q) for p, q in zip(before, net.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["sgd-momentum+wd", "adam"])
def test_to_cuda_after_training_moves_the_optimizer_state(name):
    net = make_fused(OPTIMIZERS[name], "auto", torch.float32)
    x, y = batches(2)[0]
    net.train_step(x.float(), y)
    net.to("cuda")
    for key, value in optimizer_tensors(net):
        assert value.device.type == ("cpu" if key == "step" else "cuda"), key
    assert torch.isfinite(torch.tensor(list(net.train_step(x.float().cuda(), y.cuda()).losses.values()))).all()


# ---- bf16 and autocast --------------------------------------------------------------------

def test_bf16_parameters_on_cpp_are_refused_naming_the_node_and_backends():
    with pytest.raises(TypeError, match=r"node 0: backend 'cpp' runs .*not torch.bfloat16.*'reference'"):
        lp.mlp([6, 8, 3], dtype=torch.bfloat16, backend="cpp")
    net = lp.mlp([6, 8, 3], backend="cpp")
    with pytest.raises(TypeError, match=r"node 0: backend 'cpp' .*not torch.bfloat16"):
        net.to(torch.bfloat16)


def test_bf16_parameters_train_on_the_reference_backend():
    net = lp.mlp([6, 8, 3], dtype=torch.bfloat16, backend="reference")
    x, y = torch.randn(8, 6, dtype=torch.bfloat16), torch.randint(0, 3, (8,))
    assert all(torch.isfinite(torch.tensor(v)) for v in net.train_step(x, y).losses.values())


@pytest.mark.parametrize("kind", ["autograd", "fused-reference"])
def test_cpu_autocast_around_train_step(kind):
    """Under bf16 autocast the parameters stay float32 and learn."""
    if kind == "autograd":
        net = lp.LocalSequential(nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Linear(8, 3), num_classes=3)
        net.build(torch.randn(2, 6))
    else:
        net = lp.mlp([6, 8, 3], backend="reference")
    before = [p.detach().clone() for p in net.parameters()]
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net.train_step(x, y)
    assert all(p.dtype == torch.float32 and not torch.equal(p, q) for p, q in zip(net.parameters(), before))


def test_cpu_autocast_leaves_fused_cpp_nodes_in_float32():
    """The fused ops run in float32 under autocast (as autocast's float32 list does): the
    step is exactly the step without autocast."""
    torch.manual_seed(0)
    plain, cast = lp.mlp([6, 8, 3], backend="cpp"), lp.mlp([6, 8, 3], backend="cpp")
    cast.load_state_dict(plain.state_dict())
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    plain.train_step(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast.train_step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), cast.parameters()))


# ---- gradient clipping ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("max_norm", [0.05, 1e3])  # clipping every step, and never
def test_max_grad_norm_on_fused_nodes_is_clip_grad_norm(backend, max_norm):
    """Fused nodes clip inside the update (from Gram matrices, no dW); autograd nodes call
    clip_grad_norm_ on the node's and head's parameters: the same steps (float64)."""
    torch.manual_seed(0)
    make = OPTIMIZERS["sgd-momentum+wd"]
    fused = fused_net(make, backend)
    fused.max_grad_norm = max_norm
    reference = autograd_net(fused, make)
    for net in (fused, reference):
        for node in net.nodes:
            node.max_grad_norm = max_norm
    for x, y in batches():
        fused.train_step(x, y)
        reference.train_step(x, y)
    for got, want in zip(node_tensors(fused), node_tensors(reference)):
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rows", [3, 40])  # the Gram form (batch smaller) and dW itself
def test_the_gradient_norm_of_a_linear_grad(rows):
    gen = torch.Generator().manual_seed(rows)
    err, inp = torch.randn(rows, 7, generator=gen, dtype=F64), torch.randn(rows, 5, generator=gen, dtype=F64)
    w, b = torch.zeros(7, 5, dtype=F64), torch.zeros(7, dtype=F64)
    want = (err.t() @ inp).square().sum() + err.sum(0).square().sum()
    assert torch.allclose(grad_norm_sq(ops.LinearGrad(w, b, err, inp)), want, rtol=1e-13, atol=0)


def test_max_grad_norm_under_bp_clips_the_whole_network():
    torch.manual_seed(0)
    net = lp.mlp([9, 16, 4], rule="bp", dtype=F64, max_grad_norm=0.01, optimizer=functools.partial(SGD, lr=1.0))
    before = [p.detach().clone() for p in net.parameters()]
    x, y = batches(1)[0]
    net.train_step(x, y)
    step = torch.cat([(p.detach() - q).flatten() for p, q in zip(net.parameters(), before)])
    assert torch.allclose(step.norm(), torch.tensor(0.01, dtype=F64), rtol=1e-4)  # lr 1: the step is the gradient


def test_max_grad_norm_must_be_positive():
    with pytest.raises(ValueError, match="LocalSequential: max_grad_norm must be > 0, got 0.0"):
        lp.mlp([9, 4], max_grad_norm=0.0)
