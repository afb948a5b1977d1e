"""Smoke test of ``localprop bench`` on CPU: a tiny run writes rows to the CSV."""
import csv

from localprop.cli import main
from localprop.cli.bench import FIELDS, append_csv


def read_rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_quick_cpu_run_appends_rows(tmp_path, capsys):
    out = tmp_path / "results" / "kernels.csv"
    assert main(["bench", "--device", "cpu", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped backend cuda" in printed and "median ms" in printed
    rows = read_rows(out)
    assert rows and list(rows[0]) == list(FIELDS)
    measured = {(r["op"], r["backend"]) for r in rows}
    expected = {(op, "reference") for op in ("transform", "head_error", "sgd_update", "adam_update", "greedy_step")}
    assert expected | {("torch_loop", "pytorch"), ("gemm_floor", "pytorch")} <= measured
    assert all(float(r["median_ms"]) > 0 and r["device"] and r["git_sha"] for r in rows)
    append_csv(out, rows[:1])
    assert read_rows(out) == rows + rows[:1]  # appended under the one header
