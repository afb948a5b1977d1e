"""The README's usage example runs as printed, on small stand-ins for the models and
batches it names (so the example cannot drift from the API)."""
import functools
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import localprop as lp
from localprop import zoo

README = Path(__file__).resolve().parents[1] / "README.md"


def example(heading: str) -> str:
    """The first python block after the README's ``heading``."""
    text = README.read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)


def test_the_usage_example_runs_as_printed(capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    B, T = 6, 12
    names = {
        "x": torch.randn(B, 64), "y": torch.randint(0, 10, (B,)),
        "images": torch.randn(B, 3, 16, 16), "labels": torch.randint(0, 10, (B,)),
        "values": torch.randn(B, 1),
        "ids": torch.randint(0, 32, (B, T + 1)), "mask": torch.ones(B, T, dtype=torch.long),
        "my_resnet": zoo.resnet18(width=8), "MyResNet": lambda: zoo.resnet18(width=8),
        "my_gpt": zoo.gpt(vocab=32, dim=16, layers=4, heads=2, context=T),
        "my_regressor": nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1)),
        "GPT2LMHeadModel": transformers.GPT2LMHeadModel,
        "config": transformers.GPT2Config(vocab_size=32, n_positions=T, n_embd=16, n_layer=4, n_head=2),
    }
    exec(compile(example("## Use"), str(README), "exec"), names)
    assert len(names["stats"].losses) == 3
    assert names["pred"].labels.shape == (B,)
    assert len(names["cnn"].nodes) == 4 and len(names["lm"].nodes) == 4
    assert names["lm"](names["ids"][:, :-1]).shape == (B, T, 32)
    assert "peak" in capsys.readouterr().out


def test_the_scheduler_example_runs_as_printed():
    torch.manual_seed(0)
    batches = [(torch.randn(5, 64), torch.randint(0, 10, (5,))) for _ in range(2)]
    names = {"lp": lp, "torch": torch, "functools": functools, "epochs": 3, "loader": batches}
    exec(compile(example("## Optimizers and schedulers"), str(README), "exec"), names)
    net = names["net"]
    assert all(p.dtype == torch.float64 for p in net.parameters())
    assert net.optimizers()[0].param_groups[0]["lr"] < 1e-3  # the cosine schedule stepped
    assert all(s.last_epoch == 3 for s in names["schedulers"])
