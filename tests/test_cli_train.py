"""localprop train: runs, JSON output, config errors, exact resume."""
import json

import numpy as np
import pytest
import torch

from localprop import config
from localprop.cli import main
from localprop.data import Split

SMALL = ["--epochs", "2", "--batch-size", "64", "--model", "mlp:64,32,32,10", "--threads", "1", "--quiet"]


def tiny_split() -> Split:
    """A user's dataset function: 4 classes of 6 features."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 6, generator=gen), torch.randint(0, 4, (120,), generator=gen)
    return Split(x[:96], y[:96], x[96:], y[96:], 4)


def tiny_dataset():
    return torch.utils.data.TensorDataset(torch.randn(50, 6), torch.randint(0, 3, (50,)))


def tiny_model():
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 4))


class Residual(torch.nn.Module):
    """A user's model as an nn.Module: blocks in a ModuleList, residual adds in forward."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(6, 8)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
        self.out = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        for block in self.blocks:
            h = h + torch.relu(block(h))
        return self.out(h)


def residual_model():
    return Residual()


def test_train_an_nn_module_of_ones_own(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('dataset = "tests.test_cli_train:tiny_split"\nepochs = 2\nbatch_size = 32\n'
                   '[model]\nmodule = "tests.test_cli_train:residual_model"\nnodes = 3\n')
    out = tmp_path / "r.json"
    assert main(["train", "--config", str(cfg), "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["steps"] == 6


def test_train_through_hooks_and_refused_across_ranks(tmp_path, capsys):
    out = tmp_path / "r.json"
    flags = ["train", "--dataset", "tests.test_cli_train:tiny_split", "--epochs", "2", "--batch-size", "32",
             "--model", "tests.test_cli_train:residual_model", "--nodes", "3", "--hooks", "--quiet"]
    assert main([*flags, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["steps"] == 6 and r["peak_bytes_per_rank"][0] > 0
    assert main([*flags, "--ranks", "2"]) == 2
    assert "no standalone nodes" in capsys.readouterr().err
    assert main(["train", *SMALL, "--hooks"]) == 2
    assert "config key '--hooks'" in capsys.readouterr().err


def test_train_writes_json(tmp_path):
    out = tmp_path / "r.json"
    assert main(["train", *SMALL, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["steps"] == 46 and 0.6 < r["test_accuracy"] <= 1  # 2 × ceil(1437 digits / 64)
    assert r["wall_seconds"] > 0 and r["peak_bytes_per_rank"][0] > 0 and r["ranks"] == 1


def test_toml_config_user_dataset_and_model(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('dataset = "tests.test_cli_train:tiny_split"\nepochs = 2\nbatch_size = 32\n'
                   '[model]\nmodule = "tests.test_cli_train:tiny_model"\nnodes = 3\n'
                   '[rule]\nname = "sgr"\nlam = 0.1\n[optimizer]\nname = "adam"\nlr = 0.001\n')
    out = tmp_path / "r.json"
    assert main(["train", "--config", str(cfg), "--json", str(out), "--quiet"]) == 0
    r = json.loads(out.read_text())
    assert r["steps"] == 6 and r["config"]["rule"] == {"name": "sgr", "lam": 0.1}


def test_npz_and_dataset_function(tmp_path):
    gen = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=gen.normal(size=(40, 5)), y_train=gen.integers(0, 3, 40),
             x_test=gen.normal(size=(10, 5)), y_test=gen.integers(0, 3, 10))
    split = config.dataset(config.resolve({"dataset": str(path)}))
    assert split.x_train.shape == (40, 5) and split.num_classes == 3
    split = config.dataset(config.resolve({"dataset": "tests.test_cli_train:tiny_dataset", "test_fraction": 0.2}))
    assert len(split.y_test) == 10 and len(split.y_train) == 40


@pytest.mark.parametrize("table, key", [
    ({"epochs": 0}, "epochs"),
    ({"batch_size": "64"}, "batch_size"),
    ({"epoch": 3}, "epoch"),
    ({"optimizer": {"name": "rmsprop"}}, "optimizer.name"),
    ({"optimizer": {"name": "sgd", "lr": 0.1, "momentun": 0.9}}, "optimizer"),
    ({"rule": {"name": "sgr", "lamda": 1}}, "rule"),
    ({"rule": "backprop"}, "rule"),
    ({"model": {"mlp": [64]}}, "model.mlp"),
    ({"model": {"mlp": [64, 32, 7]}}, "model.mlp"),
    ({"model": {"module": "nowhere:fn"}}, "model.module"),
    ({"dataset": "imagenet"}, "dataset"),
    ({"dataset": "missing.npz"}, "dataset"),
    ({"distributed": {"mode": "eventually"}}, "distributed.mode"),
    ({"distributed": {"staleness": -1}}, "distributed.staleness"),
])
def test_bad_config_names_key_expected_and_received(table, key):
    with pytest.raises(config.ConfigError) as err:
        cfg = config.resolve(table)
        split = config.dataset(cfg)
        config.network(cfg, split)
    assert err.value.key == key
    message = str(err.value)
    assert f"config key {key!r}: expected" in message and "received" in message


def test_bad_file_suffix(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("epochs: 1")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "a .json or .toml file" in capsys.readouterr().err


@pytest.mark.parametrize("rule", ["greedy", "critic"])
def test_resume_is_bit_for_bit(tmp_path, rule):
    """N steps straight == N/2 steps, stop, resume; the stop falls inside the second epoch."""
    args = ["train", "--epochs", "2", "--batch-size", "64", "--model", "mlp:64,32,32,10", "--rule", rule,
            "--optimizer", "adam", "--lr", "0.01", "--quiet"]
    straight, half = tmp_path / "straight.pt", tmp_path / "half.pt"
    assert main([*args, "--checkpoint", str(straight)]) == 0  # 2 × 23 steps
    assert main([*args, "--checkpoint", str(half), "--checkpoint-every", "5", "--max-steps", "31"]) == 0
    assert torch.load(half, weights_only=True)["extra"]["position"] == 8
    assert main([*args, "--checkpoint", str(half), "--resume"]) == 0
    a, b = (torch.load(p, weights_only=True) for p in (straight, half))
    assert a["net"].keys() == b["net"].keys()
    for key, value in a["net"].items():
        if key != "_extra_state":
            assert torch.equal(value, b["net"][key]), key
    assert a["net"]["_extra_state"]["steps"] == b["net"]["_extra_state"]["steps"] == 46
    assert torch.equal(a["extra"]["torch_rng"], b["extra"]["torch_rng"])


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    assert main(["train", *SMALL, "--resume", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "config key '--checkpoint': expected an existing checkpoint file" in capsys.readouterr().err


def test_a_rule_of_ones_own_by_module_and_class(tmp_path, capsys):
    args = ["train", *SMALL, "--json", str(tmp_path / "r.json"), "--quiet"]
    assert main([*args, "--rule", "tests.rules.example_rule:HardExampleGreedy", "--rule-kwargs",
                 '{"smoothing": 0.2}']) == 0
    assert main([*args, "--rule", "tests.rules.example_rule:no_such_rule"]) == 2
    assert "config key 'rule': expected an importable \"module:function\"" in capsys.readouterr().err
    assert main([*args, "--rule", "torch.nn:Linear", "--rule-kwargs", '{"in_features": 1, "out_features": 1}']) == 2
    assert "expected a localprop.rules.Rule" in capsys.readouterr().err
