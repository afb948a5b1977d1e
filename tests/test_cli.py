"""Smoke tests of the command line."""
import json
import subprocess
import sys

from localprop.cli import main


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
