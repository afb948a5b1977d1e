"""Checkpoints are all or nothing: a refused load changes nothing of the network, a
refused save leaves the previous file as it was, and what is saved loads back."""
import collections
import copy
import functools
import io
import os
import pickle
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import localprop as lp
from localprop import checkpoint
from localprop.rules import PGL, SGR, Greedy

ADAM = functools.partial(torch.optim.Adam, lr=1e-3)


def small(rule="greedy", width=16, optimizer=None, seed=0):
    """A two-node net trained for one step (so that its optimizers have state)."""
    torch.manual_seed(seed)
    net = lp.LocalSequential(lp.LocalLinear(8, width), lp.LocalLinear(width, 3, activation=None), rule=rule,
                             num_classes=3, optimizer=optimizer)
    net.train_step(torch.randn(6, 8), torch.randint(0, 3, (6,)))
    return net


def assert_same(a, b, where="state", atol=0.0):
    """Equal nested state: tensors bit for bit (or within ``atol``), everything else by ==."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]", atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{k}]", atol)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, where
        if atol:
            torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=where)
        else:
            assert torch.equal(a, b), where
    else:
        assert a == b, where


def unchanged_by(net, action, error, match):
    """``action`` raises ``error`` matching ``match`` and leaves every part of ``net``'s state
    (parameters, buffers, rule state, optimizer state, step count) as it was."""
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(error, match=match):
        action()
    assert_same(before, net.state_dict())


# ---- load: all or nothing ------------------------------------------------------------
@pytest.mark.parametrize("via", ["checkpoint.load", "load_state_dict"])
def test_a_checkpoint_of_another_width_changes_nothing(via, tmp_path):
    path = checkpoint.save(tmp_path / "ck.pt", small(width=16))
    net = small(width=32, seed=1)
    load = (lambda: checkpoint.load(path, net)) if via == "checkpoint.load" else \
        (lambda: net.load_state_dict(torch.load(path, weights_only=True)["net"]))
    # the key, the shape received from the checkpoint and the shape the network expects
    unchanged_by(net, load, RuntimeError, r"nodes\.0\.weight: copying a param with shape torch\.Size\(\[16, 8\]\) "
                                          r"from checkpoint, the shape in current model is torch\.Size\(\[32, 8\]\)")


def test_a_checkpoint_of_other_optimizers_is_refused_and_changes_nothing(tmp_path):
    path = checkpoint.save(tmp_path / "ck.pt", small())  # the default optimizer: SGD
    net = small(optimizer=ADAM, seed=1)
    unchanged_by(net, lambda: checkpoint.load(path, net), ValueError,
                 r"node '0': the checkpoint was written with optimizer torch\.optim\.sgd\.SGD, "
                 r"this network uses torch\.optim\.adam\.Adam")
    net.train_step(torch.randn(6, 8), torch.randint(0, 3, (6,)))  # its own Adam state is whole


class RenamedGreedy(Greedy):
    """Another class under the name "greedy"."""


@pytest.mark.parametrize("saved, target, match", [
    ("greedy", "sgr", "the checkpoint was written by rule 'greedy', this network trains with rule 'sgr'"),
    ("sgr", "greedy", "the checkpoint was written by rule 'sgr', this network trains with rule 'greedy'"),
    ("greedy", PGL(local="greedy"), "rule 'greedy', this network trains with rule 'pgl\\(greedy\\)'"),
    (PGL(local="greedy"), PGL(local="sgr"), "rule 'pgl\\(greedy\\)', this network trains with rule 'pgl\\(sgr\\)'"),
    ("greedy", RenamedGreedy(), r"rule 'greedy' \(localprop\.rules\.greedy\.Greedy\), this network trains with "
                                r"rule 'greedy' \(tests\.test_checkpoint\.RenamedGreedy\)"),
])
def test_a_checkpoint_of_another_rule_is_refused_and_changes_nothing(saved, target, match, tmp_path):
    path = checkpoint.save(tmp_path / "ck.pt", small(saved))
    net = small(target, seed=1)
    unchanged_by(net, lambda: checkpoint.load(path, net), ValueError, match)


def test_a_state_missing_a_key_changes_nothing():
    state = small().state_dict()
    del state["nodes.1.bias"]
    net = small(seed=1)
    unchanged_by(net, lambda: net.load_state_dict(state), RuntimeError,
                 r'Missing key\(s\) in state_dict: "nodes\.1\.bias"')


def test_other_settings_of_the_same_rule_load(tmp_path):
    saved = small(SGR(lam=0.5))
    path = checkpoint.save(tmp_path / "ck.pt", saved)
    net = small(SGR(lam=2.0), seed=1)
    checkpoint.load(path, net)
    assert_same(saved.state_dict(), net.state_dict())


def test_a_checkpoint_without_identities_still_loads(tmp_path):
    """Checkpoints written before the rule and optimizer classes were saved."""
    saved = small()
    payload = torch.load(checkpoint.save(tmp_path / "ck.pt", saved, epoch=3), weights_only=True)
    extra_state = payload["net"]["_extra_state"]
    payload["net"]["_extra_state"] = {"steps": extra_state["steps"], "optimizers": extra_state["optimizers"]}
    torch.save(payload, tmp_path / "old.pt")
    net = small(seed=1)
    assert checkpoint.load(tmp_path / "old.pt", net) == {"epoch": 3}
    assert_same(saved.state_dict()["nodes.0.weight"], net.state_dict()["nodes.0.weight"])
    assert net.steps == saved.steps


# ---- save: only what loads back --------------------------------------------------------
Point = collections.namedtuple("Point", "x y")  # a tuple subclass: pickled by its class, which weights_only refuses
EVERY_KIND = {
    "tensor": torch.arange(6).view(2, 3), "parameter": nn.Parameter(torch.ones(2)), "int": 7, "float": 0.5,
    "inf": float("inf"), "complex": 1 - 2j, "bool": True, "str": "text", "none": None, "list": [1, [2.0, "x"]],
    "tuple": (1, (None,)), "dict": {"a": {"b": torch.zeros(1)}, 3: "int", 1.5: "float", False: "bool", None: "none",
                                    (1, "a"): "tuple"},
    "ordered": collections.OrderedDict(b=1, a=2), "empty": [(), {}, []],
}


def test_every_kind_save_accepts_loads_back_with_weights_only(tmp_path):
    path = checkpoint.save(tmp_path / "ck.pt", small(), **EVERY_KIND)
    assert_same(EVERY_KIND, torch.load(path, weights_only=True)["extra"])
    assert_same(EVERY_KIND, checkpoint.load(path, small(seed=1)))


@pytest.mark.parametrize("extra, match", [
    ({"rng": torch.Generator()}, "extra 'rng': torch._C.Generator is not a tensor, number, string, bool, None, "
                                 "or list/tuple/dict of them"),
    ({"lr": np.float64(0.1)}, "extra 'lr': numpy.float64 is not a tensor"),
    ({"state": {"np": [1, np.arange(3)]}}, r"extra 'state'\['np'\]\[1\]: numpy.ndarray is not a tensor"),
    ({"point": Point(1, 2)}, "extra 'point': tests.test_checkpoint.Point is not a tensor"),
    ({"by": {(1, np.int64(2)): 3}}, r"extra 'by', key \(1, np.int64\(2\)\)\[1\]: numpy.int64 is not a tensor"),
])
def test_save_refuses_what_weights_only_cannot_load(extra, match, tmp_path):
    written = io.BytesIO()
    torch.save(extra, written)
    with pytest.raises(pickle.UnpicklingError):  # what the loader would say (without naming the key)
        torch.load(io.BytesIO(written.getvalue()), weights_only=True)
    net = small()
    path = checkpoint.save(tmp_path / "ck.pt", net, epoch=1)
    before = path.read_bytes()
    with pytest.raises(TypeError, match=match):
        checkpoint.save(path, net, **extra)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_save_refuses_unloadable_network_state(tmp_path):
    """The network's part is checked too: an optimizer's learning rate from numpy."""
    net = small(optimizer=functools.partial(torch.optim.SGD, lr=np.float64(0.1)))
    with pytest.raises(TypeError, match=r"net '_extra_state'\['optimizers'\]\[0\]\['param_groups'\]\[0\]\['lr'\]: "
                                        "numpy.float64 is not a tensor"):
        checkpoint.save(tmp_path / "ck.pt", net)
    assert list(tmp_path.iterdir()) == []


# ---- save: only finite values ----------------------------------------------------------
def with_batchnorm():
    torch.manual_seed(0)
    net = lp.LocalSequential(nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16)), nn.Linear(16, 3),
                             rule="greedy", num_classes=3)
    net.train_step(torch.randn(6, 8), torch.randint(0, 3, (6,)))
    return net


@pytest.mark.parametrize("key, spoil", [
    ("net 'nodes.0.block.0.weight'", lambda net: net.nodes[0].block[0].weight.data.__setitem__((3, 1), float("nan"))),
    ("net 'nodes.0.block.1.running_var'", lambda net: net.nodes[0].block[1].running_var.fill_(float("inf"))),
    ("net 'nodes.0.head.weight'", lambda net: net.nodes[0].head.weight.data.__setitem__((0, 0), -float("inf"))),
    ("net '_extra_state'['optimizers'][1]['state'][0]['momentum_buffer']",
     lambda net: next(iter(net.nodes[1].optimizer.state.values()))["momentum_buffer"][0, 0].fill_(float("nan"))),
])
def test_save_refuses_non_finite_network_state(key, spoil, tmp_path):
    net = with_batchnorm()
    path = checkpoint.save(tmp_path / "ck.pt", net)
    before = path.read_bytes()
    spoil(net)
    with pytest.raises(FloatingPointError, match=re.escape(f"{key}: non-finite values")):
        checkpoint.save(path, net)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_finite_values_whose_sum_overflows_are_saved(tmp_path):
    net = small()
    net.register_buffer("large", torch.full((4,), 60000.0, dtype=torch.float16))  # sum: inf in float16
    path = checkpoint.save(tmp_path / "ck.pt", net)
    assert torch.equal(torch.load(path, weights_only=True)["net"]["large"], net.large)


# ---- temporary files of killed writers -------------------------------------------------
def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_save_removes_temporary_files_of_dead_writers_only(tmp_path):
    host = socket.gethostname()
    dead, live = f".ck.pt.{host}.{dead_pid()}.k3j_9.tmp", f".ck.pt.{host}.{os.getpid()}.a8b2c.tmp"
    of_another_target = f".other.pt.{host}.{dead_pid()}.zz1.tmp"
    for name in (dead, live, of_another_target):
        (tmp_path / name).write_bytes(b"partial")
    checkpoint.save(tmp_path / "ck.pt", small())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ck.pt", live, of_another_target])


def test_the_temporary_file_names_its_writer(tmp_path, monkeypatch):
    written, replace = [], os.replace

    def record(src, dst):
        written.append(os.path.basename(src))
        replace(src, dst)
    monkeypatch.setattr(os, "replace", record)
    checkpoint.save(tmp_path / "ck.pt", small())
    assert len(written) == 1 and written[0].startswith(f".ck.pt.{socket.gethostname()}.{os.getpid()}.")
    assert written[0].endswith(".tmp")
