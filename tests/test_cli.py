"""Smoke tests of the command line."""
import json
import subprocess
import sys

from localprop.cli import main
from localprop.cli.profile import deep_mlp


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "reference" in out and "(auto)" in out


def test_demo_writes_table_json_and_png(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "MLP greedy" in out and "CNN bp" in out and "peak step KiB" in out
    rows = json.loads((tmp_path / "demo.json").read_text())
    assert [r["run"] for r in rows] == ["MLP bp", "MLP bp+checkpoint", "MLP greedy", "CNN bp", "CNN greedy"]
    assert all(0 < r["test_accuracy"] <= 1 and r["peak_step_bytes"] > 0 for r in rows)
    assert (tmp_path / "demo.png").stat().st_size > 1000


def test_profile_writes_table_json_and_png(tmp_path, capsys):
    assert main(["profile", "--depths", "2", "4", "--batches", "16", "--width", "32", "--in-features", "8",
                 "--quiet", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "profile.json").read_text())
    assert {(r["rule"], r["depth"]) for r in rows} == {(r, d) for r in ("bp", "bp+checkpoint", "greedy") for d in (2, 4)}
    assert (tmp_path / "profile.png").stat().st_size > 1000


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "localprop", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "profile" in out.stdout


def test_profile_depth_1_is_one_node_from_in_features(tmp_path, capsys):
    net = deep_mlp("bp", width=32, depth=1, in_features=8, num_classes=10)
    assert [(n.in_features, n.out_features) for n in net.nodes] == [(8, 10)]
    assert main(["profile", "--depths", "1", "--batches", "4", "--width", "32", "--in-features", "8",
                 "--rules", "bp", "--quiet", "--out", str(tmp_path)]) == 0
    assert [(r["rule"], r["depth"]) for r in json.loads((tmp_path / "profile.json").read_text())] == [("bp", 1)]


def test_deep_mlp_has_depth_nodes():
    for depth in (2, 3):
        sizes = [(n.in_features, n.out_features) for n in deep_mlp("bp", 32, depth, 8, 10).nodes]
        assert sizes == [(8, 32)] + [(32, 32)] * (depth - 2) + [(32, 10)]


# In a fresh process: c10 logs the line at the process's first such free only.
FREE_INSIDE_MEASUREMENT = """
import os, sys, torch
from localprop import memory
before = torch.randn(1000)
with memory.track_peak("cpu") as peak:
    del before  # allocated before the profiler started: c10 logs "Memory block of unknown size"
    print("python line", file=sys.stderr, flush=True)
    os.write(2, b"fd line\\n")
    os.write(2, b"no newline, ")
print("peak", peak.bytes)
try:
    with memory.track_peak("cpu"):
        raise KeyError
except KeyError:
    print("stderr is back", file=sys.stderr)
"""


def test_cpu_measurement_prints_no_profiler_log_line(capfd):
    subprocess.run([sys.executable, "-c", FREE_INSIDE_MEASUREMENT], check=True)
    out, err = capfd.readouterr()
    assert out.startswith("peak ") and "Memory block" not in out
    assert err == "python line\nfd line\nno newline, stderr is back\n"  # all of it but that one line
