"""The memory profile of a model of one's own: lp.memory.compare_model, lp.memory.timeline
and ``localprop profile --model``."""
import json

import pytest
import torch

import localprop as lp
from localprop.cli import main


def tiny_resnet():
    return lp.zoo.resnet18(width=4, classes=5)


def tiny_gpt():
    return lp.zoo.gpt(vocab=32, dim=16, layers=4, heads=2, context=16)


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 12, 12, generator=g), torch.randint(0, 5, (8,), generator=g)


def test_local_rules_take_less_memory_than_backprop_on_a_resnet():
    x, y = batch()
    rows = {m.rule: m for m in lp.memory.compare_model(tiny_resnet, x, y, rules=["bp", "greedy", "pgl"], nodes=4)}
    assert rows["greedy"].peak_bytes < rows["bp"].peak_bytes
    # pgl's period includes a global step (checkpointed end-to-end backprop): more than greedy's
    assert rows["pgl"].peak_bytes > rows["greedy"].peak_bytes


def test_the_timeline_peak_is_the_measured_peak():
    """Two readings of the same allocator: the peak of the sampled timeline is the step's peak."""
    x, y = batch()
    torch.manual_seed(0)
    measured = lp.memory.measure_step(lp.localize(tiny_resnet(), nodes=4), x, y)
    torch.manual_seed(0)
    line = lp.memory.timeline(lp.localize(tiny_resnet(), nodes=4), x, y)
    assert max(line.peaks) == measured.peak_bytes
    assert line.events[0] == "start" and line.events[-1] == "end"
    assert any(e.startswith("gradient nodes.3") for e in line.events)


def test_profile_command_on_a_users_model(tmp_path, capsys):
    code = main(["profile", "--model", "tests.test_profile_model:tiny_gpt", "--tokens", "32,10", "--batch", "4",
                 "--nodes", "2", "--rules", "bp", "greedy", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    rows = json.loads((tmp_path / "profile.json").read_text())
    assert [r["rule"] for r in rows] == ["bp", "greedy"] and all(r["peak_bytes"] > 0 for r in rows)
    assert (tmp_path / "profile.png").stat().st_size > 0
    assert "tests.test_profile_model:tiny_gpt, batch 4, 2 nodes" in capsys.readouterr().out


def test_profile_command_with_every_memory_option(tmp_path, capsys):
    """--balance memory --checkpoint --step-in-backward --lean --channels-last reach localize:
    the local rule's peak below the plain one's, and the peaks of its nodes printed, the
    highest of them the step's peak."""
    def profile(*options):
        out = tmp_path / str(len(options))
        assert main(["profile", "--model", "tests.test_profile_model:tiny_resnet", "--input-shape", "3,12,12",
                     "--batch", "8", "--nodes", "4", "--rules", "bp", "greedy", "--out", str(out), "--quiet",
                     *options]) == 0
        rows = json.loads((out / "profile.json").read_text())
        return {r["rule"]: r["peak_bytes"] for r in rows}, capsys.readouterr().out

    plain, _ = profile()
    every, printed = profile("--balance", "memory", "--checkpoint", "--step-in-backward", "--lean", "--channels-last")
    assert every["greedy"] < plain["greedy"]
    peaks = [float(v) for v in printed.split("each node's step peak, MiB: ")[1].splitlines()[0].split(", ")]
    assert len(peaks) == 4 and max(peaks) == pytest.approx(every["greedy"] / 2**20, abs=0.05)


@pytest.mark.parametrize("argv,message", [
    (["--model", "tests.test_profile_model:tiny_gpt"], "give --input-shape C,H,W"),
    (["--model", "tests.test_profile_model:tiny_gpt", "--tokens", "32,10", "--channels-last"],
     "--channels-last: expected image inputs --input-shape C,H,W, got a batch of shape [128, 10]"),
    (["--model", "tests.test_profile_model:tiny_gpt", "--tokens", "32,10", "--hooks", "--checkpoint"],
     "localize(hooks=True): checkpoint=True needs the model cut into standalone nodes"),
    (["--model", "tests.test_profile_model:nothing", "--tokens", "3,4"], "importable"),
    (["--model", "tests.test_profile_model:tiny_gpt", "--tokens", "32"], "expected VOCAB,SEQ"),
])
def test_profile_command_errors(argv, message, tmp_path, capsys):
    assert main(["profile", *argv, "--out", str(tmp_path), "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_describe_shows_which_node_sets_the_step_peak():
    x, y = batch()
    torch.manual_seed(0)
    net = lp.localize(tiny_resnet(), nodes=4).build(x)
    before = [p.detach().clone() for p in net.parameters()]
    summary = net.describe(x, y)
    peaks = [n.step_peak for n in summary.nodes]
    torch.manual_seed(0)
    measured = lp.memory.measure_step(lp.localize(tiny_resnet(), nodes=4).build(x), x, y)
    assert max(peaks) == measured.peak_bytes and peaks[0] == max(peaks)  # the full-resolution node
    assert net.steps == 0 and all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert "step peak MiB" in str(summary)


def tiny_hf_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def test_profile_command_with_hooks_on_a_huggingface_model(tmp_path, capsys):
    tiny_hf_gpt2()  # skips without transformers
    code = main(["profile", "--model", "tests.test_profile_model:tiny_hf_gpt2", "--tokens", "32,10", "--batch", "4",
                 "--nodes", "2", "--hooks", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    rows = json.loads((tmp_path / "profile.json").read_text())
    assert [r["rule"] for r in rows] == ["bp", "greedy", "pgl"] and all(r["peak_bytes"] > 0 for r in rows)
    assert (tmp_path / "profile.png").stat().st_size > 0
