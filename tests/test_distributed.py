"""The decoupled pipeline over gloo processes on CPU: bit-for-bit equality with one
process (greedy; sgr's forward messages; critic's backward messages; bll's top-down
prototypes; decoupled locprop's composite maps; pgl's global steps), async resume, refused rules, and a dead or hung rank
stopping the run with a clear error in bounded time."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import localprop as lp
from localprop import distributed, rules
from localprop.cli import main
from localprop.cli.train import rank_checkpoint, rank_steps

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


def rank_file(path, rank):
    """The one checkpoint file a finished run leaves for ``rank`` (older sets are removed)."""
    steps = rank_steps(path, rank)
    assert len(steps) == 1, steps
    return rank_checkpoint(path, rank, steps[0])


def owned(path, ranks):
    """{state key: tensor} of every node from the rank checkpoint that trained it."""
    out = {}
    for r in range(ranks):
        ck = torch.load(rank_file(path, r), weights_only=True)
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
    ('{"name": "bll", "feedback": "direct"}', 2, "[2, 1]"),  # prototypes from the labels: no message
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
    ck = torch.load(rank_file(stopped, 0), weights_only=True)["extra"]
    assert ck["pending_steps"].tolist() == [8, 9, 10]  # staleness + 1 outputs wait for their message
    assert len(ck["pending_back"]) == 3
    assert main([*BASE, "--checkpoint", str(stopped), *args, "--resume"]) == 0
    assert_same_nodes_between(straight, stopped)


def test_async_bll_reads_stale_prototypes_and_resumes_exactly(tmp_path):
    args = ("--rule", "bll", "--ranks", "3", "--mode", "async", "--staleness", "2")
    straight = train(tmp_path, "straight", *args)
    stopped = train(tmp_path, "stopped", *args, "--max-steps", "11")
    ck = torch.load(rank_file(stopped, 0), weights_only=True)["extra"]
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
    ("hang", "rank 0 of 2 stopped with exit code 2"),  # rank 0 times out waiting for rank 1 (a user error: 2)
])
def test_dead_or_hung_rank_stops_the_run(tmp_path, capfd, action, message):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"model": {"module": "tests.test_distributed:faulty_model", "nodes": 2, "kwargs": '
                   f'{{"action": "{action}"}}}}, "distributed": {{"partition": [1, 1], "timeout": 5}}}}')
    start = time.monotonic()
    assert main(["train", "--config", str(cfg), "--ranks", "2", "--epochs", "3", "--threads", "1", "--quiet"]) == 2
    assert time.monotonic() - start < 60
    err = capfd.readouterr().err
    assert message in err
    if action == "hang":
        assert "rank 0: waiting for" in err


# ---- faults of the launch, the configuration and the checkpoints ------------------------
def start_ranks(tmp_path, extra_per_rank, ranks=2):
    """Start ranks as torchrun does (RANK etc. in the environment, no launcher); each gets
    BASE plus its own extra flags. Returns the processes, stderr to files."""
    env = {**os.environ, "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(distributed.free_port())}
    procs = []
    for r in range(ranks):
        err = open(tmp_path / f"rank{r}.err", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "localprop", *BASE, *extra_per_rank[r]], stderr=err,
                                      stdout=subprocess.DEVNULL, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}))
    return procs


@pytest.mark.parametrize("flag, values, key", [
    ("--seed", ("0", "1"), "config.seed"),               # another batch order: the wrong labels
    ("--batch-size", ("64", "32"), "config.batch_size"),  # aborted a rank inside gloo
    ("--mode", ("sync", "async"), "config.distributed.mode"),  # ran silently
])
def test_ranks_started_differently_refuse_to_train(tmp_path, flag, values, key):
    procs = start_ranks(tmp_path, [[flag, v] for v in values])
    codes = [p.wait(timeout=120) for p in procs]
    assert all(code != 0 for code in codes)
    for r in range(2):
        assert f"ranks disagree on {key}: rank 0 has" in (tmp_path / f"rank{r}.err").read_text()


def test_partition_is_a_cost_model_not_a_timing():
    net = lp.LocalSequential(lp.LocalLinear(64, 32), lp.LocalLinear(32, 32), lp.LocalLinear(32, 10, activation=None),
                             num_classes=10)
    # per sample, 3x the forward FLOPs (2 a multiply-add) of each node and its head (a linear 32 -> 10)
    macs = [64 * 32 + 32 * 10, 32 * 32 + 32 * 10, 32 * 10]
    assert distributed.node_flops(net) == [3 * 2 * m for m in macs]
    assert distributed.partition(distributed.node_flops(net), 2) == [1, 2]


def test_a_torn_checkpoint_set_resumes_from_the_last_complete_one(tmp_path, capfd):
    args = ("--rule", "critic", "--ranks", "2", "--checkpoint-every", "3")
    straight = train(tmp_path, "straight", *args)
    path = train(tmp_path, "run", *args, "--max-steps", "6")
    kept = {r: rank_checkpoint(path, r, 6).read_bytes() for r in range(2)}
    assert main([*BASE, "--checkpoint", str(path), *args, "--max-steps", "9", "--resume"]) == 0
    # as a kill between the ranks' writes of step 9 leaves it: rank 0 wrote step 9, rank 1 did not
    for r in range(2):
        rank_checkpoint(path, r, 6).write_bytes(kept[r])
    rank_checkpoint(path, 1, 9).unlink()
    capfd.readouterr()
    assert main([*BASE, "--checkpoint", str(path), *args, "--resume"]) == 0
    assert "resuming from step 6, the last step every rank saved" in capfd.readouterr().err
    assert_same_nodes_between(straight, path)
    rank_checkpoint(path, 1, rank_steps(path, 1)[0]).unlink()
    assert main([*BASE, "--checkpoint", str(path), *args, "--resume"]) == 2
    assert "a complete set of rank checkpoints to resume from (rank 0: [23]; rank 1: none)" in capfd.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--rule", "bp"], "needs global backpropagation"),
    (["--ranks", "4"], "at most one rank per node (3 nodes)"),
    (["--resume"], "a --checkpoint PATH to resume from"),
])
def test_refusals_come_before_any_rank_starts(monkeypatch, capfd, flags, message):
    def no_launch(*args, **kwargs):
        raise AssertionError("ranks were started")

    monkeypatch.setattr(distributed, "launch", no_launch)
    assert main([*BASE, "--ranks", "2", *flags]) == 2
    assert message in capfd.readouterr().err


def children(pid):
    """Pids whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_rank_outlives_the_launcher(tmp_path, sig):
    launcher = subprocess.Popen([sys.executable, "-m", "localprop", *BASE, "--ranks", "2", "--epochs", "1000"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = []
    for _ in range(600):  # until both ranks exist (bounded; no timing is asserted)
        ranks = children(launcher.pid)
        if len(ranks) == 2:
            break
        time.sleep(0.1)
    assert len(ranks) == 2
    launcher.send_signal(sig)
    launcher.wait(timeout=60)
    for _ in range(600):  # the ranks end: stopped by the launcher, or by their parent-death signal
        if not any(alive(p) for p in ranks):
            break
        time.sleep(0.1)
    assert not any(alive(p) for p in ranks)
    assert launcher.returncode == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL)


def test_joining_a_port_taken_by_another_program_ends_within_the_timeout():
    with socket.socket() as taken:  # listens, but never answers a rendezvous handshake
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(taken.getsockname()[1])}
        code = "from localprop import distributed; distributed.init_from_env(2.0)"
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert "could not join the gloo process group" in done.stderr and "within 2 s" in done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_rank_exits_without_gloo_threads(tmp_path):
    """The step-memory measurement (torch's profiler) once kept the process group alive past
    destroy_process_group, its gloo threads still running at exit."""
    code = ("import os, sys, pathlib; from localprop.cli import train, parser\n"
            "args = parser().parse_args(sys.argv[1:])\n"
            "train.run_rank(train.config.resolve(train.table(args)), args)\n"
            "names = [t.read_text().strip() for t in pathlib.Path('/proc/self/task').glob('*/comm')]\n"
            "print(' '.join(n for n in names if 'gloo' in n or 'tcpstore' in n))\n")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(distributed.free_port())}
    done = subprocess.run([sys.executable, "-c", code, *BASE, "--max-steps", "3"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_a_rule_of_one_file_trains_on_two_ranks_as_in_one_process(tmp_path):
    """tests/rules/example_rule.py declares a forward message; nothing in localprop knows it."""
    rule = '"tests.rules.example_rule:HardExampleGreedy"'
    (tmp_path / "single.json").write_text(f'{{"rule": {rule}}}')
    (tmp_path / "c.json").write_text(f'{{"rule": {rule}, "distributed": {{"partition": [1, 2]}}}}')
    single = train(tmp_path, "single", "--config", str(tmp_path / "single.json"))
    dist_path = train(tmp_path, "dist", "--ranks", "2", "--config", str(tmp_path / "c.json"))
    assert_same_nodes(single, dist_path, 2)
