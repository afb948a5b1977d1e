"""The command's errors: one line on stderr and an exit code (2 for a user error, 1 for an
unexpected one, 130 for an interrupt), the traceback only with --debug; and the errors
themselves: short reprs in ConfigError, the device flag, the optimizer's numbers."""
import importlib.metadata
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import localprop.cli.info
from localprop import config
from localprop.cli import main
from localprop.data import Split


def tiny_split() -> Split:
    """A user's dataset function: 4 classes of 6 features."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=gen), torch.randint(0, 4, (40,), generator=gen)
    return Split(x[:32], y[:32], x[32:], y[32:], 4)


class Tower(nn.Module):
    """A model localize() cannot trace (it has no forward), whose repr runs over many lines."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(30))


def tower():
    return Tower()


def error_line(capsys) -> str:
    """The one line the command wrote to stderr, without its newline; nothing on stdout."""
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err[:-1]


# ---- main: messages and exit codes ---------------------------------------------------------
def test_user_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 1")
    assert main(["train", "--config", str(path)]) == 2
    assert error_line(capsys) == (f"localprop: error: config key 'config': expected a .json or .toml file, "
                                  f"received {str(path)!r} (str)")


def test_missing_config_file_is_a_user_error(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.json")]) == 2
    assert error_line(capsys).startswith("localprop: error: [Errno 2] No such file or directory")


def test_unavailable_backend_is_a_user_error(tmp_path, capsys):
    assert main(["profile", "--depths", "1", "--batches", "2", "--width", "4", "--in-features", "4", "--rules", "bp",
                 "--backend", "cuda", "--quiet", "--out", str(tmp_path)]) == 2
    assert error_line(capsys) == ("localprop: error: backend 'cuda' is not available: "
                                  "the cuda backend runs on CUDA tensors")


def test_debug_lets_the_exception_through(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 1")
    with pytest.raises(config.ConfigError, match="a .json or .toml file"):
        main(["--debug", "train", "--config", str(path)])


def fail_with(exc):
    def run(args):
        raise exc
    return run


def test_unexpected_error_names_its_type_and_exit_code_1(monkeypatch, capsys):
    monkeypatch.setattr(localprop.cli.info, "run", fail_with(KeyError("boom")))
    assert main(["info"]) == 1
    assert error_line(capsys) == ("localprop: unexpected error: KeyError: 'boom' "
                                  "(run with --debug for the traceback)")


def test_unexpected_error_with_debug_propagates(monkeypatch):
    monkeypatch.setattr(localprop.cli.info, "run", fail_with(KeyError("boom")))
    with pytest.raises(KeyError, match="boom"):
        main(["--debug", "info"])


def test_interrupt_is_one_line_and_exit_code_130(monkeypatch, capsys):
    monkeypatch.setattr(localprop.cli.info, "run", fail_with(KeyboardInterrupt()))
    assert main(["info"]) == 130
    assert error_line(capsys) == "localprop: interrupted"


def test_python_m_localprop_exits_with_the_code(tmp_path):
    done = subprocess.run([sys.executable, "-m", "localprop", "profile", "--depths", "0", "--quiet",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == "localprop: error: depth: expected an integer >= 1 (the number of nodes), received 0\n"


def test_console_script_is_main():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="localprop")
    assert script.load() is main  # which exits with main's return value


# ---- ConfigError: what was received, briefly -----------------------------------------------
def test_module_is_named_by_its_type_not_its_repr(tmp_path, capsys):
    table = {"dataset": "tests.test_cli_errors:tiny_split", "model": {"module": "tests.test_cli_errors:tower"}}
    cfg = config.resolve(table)
    with pytest.raises(config.ConfigError) as err:
        config.network(cfg, config.dataset(cfg))
    assert str(err.value).startswith("config key 'model': expected a model that localize() accepts (localize: "
                                     "torch.fx cannot trace Tower.forward")
    assert "ModuleList" not in str(err.value)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(table))
    assert main(["train", "--config", str(path), "--quiet"]) == 2
    assert "torch.fx cannot trace Tower.forward" in error_line(capsys)


def test_long_repr_is_cut_to_one_short_line():
    message = str(config.ConfigError("dataset", "a name", {"x": torch.arange(1000.0).reshape(100, 10)}))
    assert message.startswith("config key 'dataset': expected a name, received {'x': tensor([[")
    assert message.endswith("... (dict)") and "\n" not in message and len(message) < 200


def test_long_string_is_kept_whole():
    path = "/data/" + "d" * 100 + "/train.npz"
    assert str(config.ConfigError("dataset", "an existing .npz file", path)).endswith(f"received {path!r} (str)")


# ---- --device ------------------------------------------------------------------------------
DEVICE_COMMANDS = [["profile", "--depths", "1", "--batches", "2", "--width", "4", "--in-features", "4",
                    "--rules", "bp", "--quiet"], ["bench", "--quick"]]


@pytest.mark.parametrize("command", DEVICE_COMMANDS, ids=lambda c: c[0])
def test_cuda_on_a_cpu_build_is_refused_before_any_work(monkeypatch, tmp_path, capsys, command):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    out = tmp_path / "out"
    assert main([*command, "--device", "cuda", "--out", str(out)]) == 2
    assert error_line(capsys) == (f"localprop: error: --device cuda: this torch ({torch.__version__}) is a CPU "
                                  "build; install a CUDA build of torch to use the GPU")
    assert not out.exists()


@pytest.mark.parametrize("command", DEVICE_COMMANDS, ids=lambda c: c[0])
def test_cuda_build_without_a_visible_gpu_says_so(monkeypatch, tmp_path, capsys, command):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*command, "--device", "cuda", "--out", str(tmp_path / "out")]) == 2
    assert error_line(capsys).startswith(f"localprop: error: --device cuda: this torch ({torch.__version__}, "
                                         "CUDA 12.8) sees no GPU")


def test_cuda_index_beyond_the_visible_gpus(monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main(DEVICE_COMMANDS[0] + ["--device", "cuda:2"]) == 2
    assert error_line(capsys) == "localprop: error: --device cuda:2: only 2 GPUs are visible (cuda:0 to cuda:1)"


@pytest.mark.parametrize("name", ["mps", "gpu", "cuda:x"])
def test_device_other_than_cpu_or_cuda(capsys, name):
    assert main(DEVICE_COMMANDS[0] + ["--device", name]) == 2
    assert error_line(capsys) == f"localprop: error: --device {name}: expected cpu, cuda or cuda:<index>"


# ---- optimizer numbers ---------------------------------------------------------------------
@pytest.mark.parametrize("optimizer, key", [
    ({"name": "sgd", "lr": float("inf")}, "optimizer.lr"),
    (json.loads('{"name": "sgd", "lr": 1e400}'), "optimizer.lr"),
    (json.loads('{"name": "sgd", "lr": NaN}'), "optimizer.lr"),
    ({"name": "sgd", "lr": 0}, "optimizer.lr"),
    ({"name": "sgd", "lr": -0.1}, "optimizer.lr"),
    ({"name": "sgd", "lr": "0.1"}, "optimizer.lr"),
    ({"name": "sgd", "lr": True}, "optimizer.lr"),
    ({"name": "sgd", "lr": 10 ** 400}, "optimizer.lr"),  # an int: beyond float's range, not inf
    ({"name": "sgd", "lr": 0.1, "momentum": float("nan")}, "optimizer.momentum"),
    ({"name": "adamw", "lr": 0.1, "weight_decay": float("inf")}, "optimizer.weight_decay"),
    ({"name": "adam", "lr": 0.1, "betas": [0.9, float("-inf")]}, "optimizer.betas"),
])
def test_optimizer_numbers_must_be_finite_and_lr_positive(optimizer, key):
    with pytest.raises(config.ConfigError) as err:
        config.resolve({"optimizer": optimizer})
    assert err.value.key == key


def test_finite_optimizer_numbers_pass():
    cfg = config.resolve({"optimizer": {"name": "adam", "lr": 3e-4, "betas": [0.9, 0.999], "weight_decay": 0}})
    assert cfg["optimizer"]["lr"] == 3e-4


def test_lr_flag_inf_is_a_user_error(capsys):
    assert main(["train", "--lr", "inf", "--epochs", "1", "--max-steps", "2", "--quiet"]) == 2
    assert error_line(capsys) == "localprop: error: config key 'optimizer.lr': expected a finite number > 0, " \
                                 "received inf (float)"
