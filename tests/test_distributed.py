"""The decoupled pipeline over gloo processes on CPU: bit-for-bit equality with one
process (greedy; sgr's forward messages; critic's backward messages; bll's top-down
prototypes; decoupled locprop's composite maps; pgl's global steps), async resume, refused rules, and a dead or hung rank
stopping the run with a clear error in bounded time."""
import json
import os
import signal
import time

import pytest
import torch
from torch import nn

import localprop as lp
from localprop import distributed, rules
from localprop.cli import main
from localprop.cli.train import rank_checkpoint

BASE = ["train", "--epochs", "1", "--batch-size", "64", "--model", "mlp:64,32,32,10", "--threads", "1",
        "--quiet", "--timeout", "20"]


@pytest.fixture(autouse=True)
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def train(tmp_path, name, *extra):
    path = tmp_path / f"{name}.pt"
    assert main([*BASE, "--checkpoint", str(path), *extra]) == 0
    return path


def owned(path, ranks):
    """{state key: tensor} of every node from the rank checkpoint that trained it."""
    out = {}
    for r in range(ranks):
        ck = torch.load(rank_checkpoint(path, r), weights_only=True)
        counts = ck["extra"]["partition"].tolist()
        mine = range(sum(counts[:r]), sum(counts[:r + 1]))
        out.update({k: v for k, v in ck["net"].items() if k.startswith("nodes.") and int(k.split(".")[1]) in mine})
    return out


def assert_same_nodes(single, dist_path, ranks):
    reference = {k: v for k, v in torch.load(single, weights_only=True)["net"].items() if k.startswith("nodes.")}
    got = owned(dist_path, ranks)
    assert got.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(value, got[key]), key


@pytest.mark.parametrize("rule, ranks, partition", [
    ("greedy", 2, "\"cost\""),
    ("sgr", 2, "[1, 2]"),      # SGR's gradient message crosses the boundary forward
    ("critic", 3, "[1, 1, 1]"),  # per-sample losses cross both boundaries backward
    ('{"name": "locprop", "mode": "decoupled", "propagation": "feedback"}', 2, "[2, 1]"),  # goals from labels
    ('{"name": "locprop", "mode": "decoupled"}', 3, "[1, 1, 1]"),  # composite maps of the weights, back
    ('{"name": "locprop", "mode": "decoupled", "propagation": "inverse"}', 2, "[1, 2]"),  # learned inverses
    ("bll", 3, "[1, 1, 1]"),     # prototypes chain back through two boundaries
    ('{"name": "pgl", "local": "critic", "period": 3}', 3, "[1, 1, 1]"),  # global steps among critic steps
])
def test_sync_pipeline_equals_one_process_bit_for_bit(tmp_path, rule, ranks, partition):
    cfg = tmp_path / "c.json"
    rule_value = rule if rule.startswith("{") else f'"{rule}"'
    (tmp_path / "single.json").write_text(f'{{"rule": {rule_value}}}')
    cfg.write_text(f'{{"rule": {rule_value}, "distributed": {{"partition": {partition}}}}}')
    single = train(tmp_path, "single", "--config", str(tmp_path / "single.json"), "--json", str(tmp_path / "1.json"))
    dist_path = train(tmp_path, "dist", "--ranks", str(ranks), "--config", str(cfg), "--json", str(tmp_path / "n.json"))
    assert_same_nodes(single, dist_path, ranks)
    # each rank holds only its own nodes, their state and optimizer state: together, one process's
    held = [json.loads((tmp_path / f"{n}.json").read_text())["resident_bytes_per_rank"] for n in (1, "n")]
    assert sum(held[1]) == held[0][0] and max(held[1]) < held[0][0]


def test_async_critic_is_stale_and_resumes_exactly(tmp_path):
    args = ("--rule", "critic", "--ranks", "2", "--mode", "async", "--staleness", "2")
    straight = train(tmp_path, "straight", *args)
    stopped = train(tmp_path, "stopped", *args, "--max-steps", "11")
    ck = torch.load(rank_checkpoint(stopped, 0), weights_only=True)["extra"]
    assert ck["pending_steps"].tolist() == [8, 9, 10]  # staleness + 1 outputs wait for their message
    assert len(ck["pending_back"]) == 3
    assert main([*BASE, "--checkpoint", str(stopped), *args, "--resume"]) == 0
    assert_same_nodes_between(straight, stopped)


def test_async_bll_reads_stale_prototypes_and_resumes_exactly(tmp_path):
    args = ("--rule", "bll", "--ranks", "3", "--mode", "async", "--staleness", "2")
    straight = train(tmp_path, "straight", *args)
    stopped = train(tmp_path, "stopped", *args, "--max-steps", "11")
    ck = torch.load(rank_checkpoint(stopped, 0), weights_only=True)["extra"]
    assert ck["top_steps"].tolist() == [9, 10, 11]  # step 11 reads 9; steps 12, 13 read 10, 11
    assert main([*BASE, "--checkpoint", str(stopped), *args, "--resume"]) == 0
    assert_same_nodes_between(straight, stopped, 3)
    sync = train(tmp_path, "sync", "--rule", "bll", "--ranks", "3")
    assert not all(torch.equal(v, owned(sync, 3)[k]) for k, v in owned(straight, 3).items())


def assert_same_nodes_between(a_path, b_path, ranks=2):
    a, b = owned(a_path, ranks), owned(b_path, ranks)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("rule", [rules.BP(), rules.BP(checkpoint=True), rules.LocProp(mode="sync")])
def test_rules_needing_global_backprop_are_refused(rule):
    with pytest.raises(distributed.NotDecoupled, match="global backpropagation"):
        distributed.stage_for(rule)


def test_pipeline_runs_chains_only(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(distributed.free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        with pytest.raises(TypeError, match="Pipeline runs a LocalSequential .* got LocalGraph"):
            distributed.Pipeline(lp.LocalGraph(), [1])
    finally:
        torch.distributed.destroy_process_group()


def test_partition_balances_the_slowest_stage():
    assert distributed.partition([1, 1, 1, 1], 2) == [2, 2]
    assert distributed.partition([5, 1, 1, 1], 2) == [1, 3]
    assert distributed.partition([1, 1, 1, 6], 2) == [3, 1]
    assert distributed.partition([4, 1, 1, 1, 1, 4], 3) == [1, 4, 1]
    with pytest.raises(ValueError, match="at least one node"):
        distributed.partition([1, 1], 3)


class Fault(nn.Module):
    """Identity until its 6th call on rank 1 (the dry run makes one), then dies or hangs."""

    def __init__(self, action: str) -> None:
        super().__init__()
        self.action, self.calls = action, 0

    def forward(self, x):
        self.calls += 1
        if os.environ.get("RANK") == "1" and self.calls == 6:
            if self.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)
        return x


def faulty_model(action: str) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10), Fault(action))


@pytest.mark.parametrize("action, message", [
    ("kill", "rank 1 of 2 stopped with signal SIGKILL"),
    ("hang", "rank 0 of 2 stopped with exit code 1"),  # rank 0 times out waiting for rank 1
])
def test_dead_or_hung_rank_stops_the_run(tmp_path, capfd, action, message):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"model": {"module": "tests.test_distributed:faulty_model", "nodes": 2, "kwargs": '
                   f'{{"action": "{action}"}}}}, "distributed": {{"partition": [1, 1], "timeout": 5}}}}')
    start = time.monotonic()
    with pytest.raises(distributed.DistributedError, match=message):
        main(["train", "--config", str(cfg), "--ranks", "2", "--epochs", "3", "--threads", "1", "--quiet"])
    assert time.monotonic() - start < 60
    if action == "hang":
        assert "rank 0: waiting for" in capfd.readouterr().err
