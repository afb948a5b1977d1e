"""``localprop bench``: arguments, the statistics and the noise warning on synthetic timings,
the results schema round trip, the --model path on a tiny model, and the errors for an
absent device or backend. Nothing here depends on how fast or how loaded the machine is."""
import json

import pytest
import torch

import localprop
from localprop import benchresults
from localprop.cli import bench, main
from localprop.ops import backends

HAS_CPP = backends.why_unavailable("cpp", torch.device("cpu")) is None


def tiny_resnet():
    return localprop.zoo.resnet18(width=4, classes=5)


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---- statistics ------------------------------------------------------------------------
def test_quantiles_interpolate_like_numpy():
    assert benchresults.quantiles([5.0]) == (5.0, 5.0, 5.0)
    median, p20, p80 = benchresults.quantiles([float(v) for v in range(1, 11)])  # 1..10
    assert (median, p20, p80) == pytest.approx((5.5, 2.8, 8.2))
    with pytest.raises(ValueError, match="no samples"):
        benchresults.quantiles([])


def test_paired_ratio_cancels_drift_between_rounds():
    base = [1.0, 2.0, 4.0, 8.0, 16.0]  # the machine slows down round by round
    other = [0.5 * t for t in base]  # ... and a provider twice as fast in every round
    assert benchresults.paired_ratio(other, base) == (0.5, 0.5, 0.5)
    assert benchresults.relative_spread(base) > 1  # unpaired, the drift would swamp it
    with pytest.raises(ValueError, match="3 samples against 2"):
        benchresults.paired_ratio([1, 2, 3], [1, 2])


def test_summarize_gives_quantiles_and_paired_ratio():
    case = bench.Case("greedy_step", "width=8", "fp32", {"plain": None, "fast": None}, "plain")
    times = {"plain": [10.0, 12.0, 14.0, 16.0, 18.0], "fast": [5.0, 6.0, 7.0, 8.0, 9.0]}
    rows = {r.provider: r for r in bench.summarize(case, times, benchresults.environment())}
    assert (rows["fast"].median, rows["fast"].ratio, rows["fast"].ratio_p20, rows["fast"].ratio_p80) == \
        pytest.approx((7.0, 0.5, 0.5, 0.5))
    assert rows["plain"].ratio == 1.0 and rows["fast"].baseline == "plain"
    assert rows["plain"].p20 == pytest.approx(11.6) and rows["plain"].p80 == pytest.approx(16.4)


# ---- noise ----------------------------------------------------------------------------
STEADY = {"a": [1.0, 1.01, 0.99, 1.0, 1.02] * 3, "b": [2.0, 2.02, 1.98, 2.0, 2.01] * 3}
NOISY = {"a": [1.0, 1.5, 0.8, 2.0, 1.1] * 3, "b": STEADY["b"]}


def test_no_warning_when_quiet():
    assert bench.noise_warnings(STEADY, rounds=15, load=0.1, cores=2, threads=1, mhz=(2600, 2600)) == []


def test_noise_warning_says_load():
    [line] = bench.noise_warnings(NOISY, rounds=15, load=3.9, cores=2, threads=2)
    assert line.startswith("warning: run-to-run spread") and "(a)" in line
    assert "load average 3.90 on 2 cores with 2 threads" in line and "--threads 1" in line


def test_noise_warning_says_too_few_rounds_and_clock():
    [line] = bench.noise_warnings(NOISY, rounds=5, load=0.0, cores=2, threads=1, mhz=(2600, 1800))
    assert f"only 5 rounds (use --rounds {bench.MIN_ROUNDS}" in line and "from 2600 to 1800 MHz" in line
    assert "load average" not in line


def test_noise_warning_without_a_cause_says_so():
    [line] = bench.noise_warnings(NOISY, rounds=15, load=None, cores=2, threads=1)
    assert "no cause found" in line


def test_load_alone_warns_even_when_spread_is_small():
    [line] = bench.noise_warnings(STEADY, rounds=15, load=3.0, cores=2, threads=1)
    assert "load average 3.00" in line and "may shift" in line
    assert bench.noise_warnings(STEADY, rounds=15, load=1.2, cores=2, threads=1) == []  # 1 core left idle


# ---- timing loop (call counts only, never durations) ----------------------------------------
def test_alternate_rotates_order_and_inputs():
    order, seen = [], {"a": [], "b": []}

    def provider(name):
        def call(i):
            order.append(name)
            seen[name].append(i)
        return call
    times = bench.alternate({"a": provider("a"), "b": provider("b")}, rounds=4, sync=lambda: None)
    assert all(len(ts) == 4 for ts in times.values())
    assert seen["a"] == list(range(len(seen["a"])))  # every call takes the next input copy
    firsts = [order[i] for i in range(1, len(order)) if order[i] != order[i - 1]]
    assert set(firsts) == {"a", "b"}  # each goes first in some rounds


def test_threads_default_to_physical_cores():
    assert bench.set_threads(None) == (bench.physical_cores(), bench.physical_cores())
    assert torch.get_num_threads() == bench.physical_cores()
    assert bench.set_threads(1)[0] == 1 and torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="--threads"):
        bench.set_threads(0)


def test_arguments():
    args = bench_args([])
    assert (args.threads, args.rounds, args.baseline, args.model) == (None, None, "plain", None)
    args = bench_args(["--threads", "1", "--rounds", "7", "--model", "m:f", "--input-shape", "3,12,12"])
    assert (args.threads, args.rounds, args.input_shape) == (1, 7, [3, 12, 12])
    assert bench.settings(bench_args(["--quick"]), torch.device("cpu")) == ([64], [32], ["fp32"], 5)
    with pytest.raises(SystemExit):
        bench_args(["--input-shape", "3,x"])


def bench_args(argv):
    from localprop.cli import parser
    return parser().parse_args(["bench", *argv])


# ---- results schema ------------------------------------------------------------------------
def test_schema_round_trip(tmp_path):
    path = tmp_path / "r.csv"
    a = benchresults.Result(case="greedy_step", provider="cpp", metric="median_ms", median=1.25, p20=1.2, p80=1.3,
                            ratio=0.5, ratio_p20=0.45, ratio_p80=0.55, baseline="plain", shape="width=8",
                            dtype="fp32", **benchresults.environment())
    b = benchresults.Result(case="greedy_step", provider="plain", metric="peak_mib", median=0.1 + 0.2)
    benchresults.write(path, [a])
    benchresults.write(path, [b])  # appended under the one header
    assert path.read_text().splitlines()[0] == ",".join(benchresults.FIELDS)
    assert benchresults.FIELDS == ("case", "provider", "shape", "dtype", "threads", "device", "metric", "median",
                                   "p20", "p80", "ratio", "ratio_p20", "ratio_p80", "baseline", "versions",
                                   "git_sha", "date")
    assert benchresults.read(path) == [a, b]  # every float exactly, empty cells as None
    table = benchresults.markdown(benchresults.read(path), "median_ms")
    assert "| greedy_step | width=8 | cpp | median_ms | 1.25 [1.2, 1.3] | 0.5 [0.45, 0.55] | plain |" in table
    assert "peak_mib" not in table


def test_schema_refuses_other_columns(tmp_path):
    legacy = tmp_path / "old.csv"
    legacy.write_text("date,op,backend,median_ms\n2026-01-01,transform,cpp,1.0\n")
    with pytest.raises(ValueError, match="not the results schema"):
        benchresults.read(legacy)
    with pytest.raises(ValueError, match="not the results schema"):
        benchresults.write(legacy, [])


def test_bench_scripts_rows_map_to_the_schema():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import common

    row = {**common.stamp(), "op": "greedy_step", "backend": "cpp", "width": 256, "depth": 4, "batch": 256,
           "dtype": "float32", "median_ms": 3.1, "ratio_vs_plain": 1.03, "ratio_vs_gemm_floor": 2.8}
    timed, floor = common.to_results("cpu_fused", row)
    assert (timed.case, timed.provider, timed.shape, timed.metric, timed.median, timed.ratio, timed.baseline) == \
        ("greedy_step", "cpp", "width=256 depth=4 batch=256", "median_ms", 3.1, 1.03, "plain")
    assert (floor.metric, floor.median, floor.ratio) == ("ratio_vs_gemm_floor", 2.8, None)
    ranks = common.to_results("distributed", {**common.stamp(), "run": "pipe", "ranks": 2, "samples_per_s": 10.0,
                                              "peak_kib_per_rank": "30 40"})
    assert [(r.metric, r.median, r.shape) for r in ranks[1:]] == [("peak_kib_per_rank", 30.0, "ranks=2 item=0"),
                                                                  ("peak_kib_per_rank", 40.0, "ranks=2 item=1")]


# ---- runs --------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_CPP, reason="the C++ extension is not built")
def test_quick_cpu_run_writes_schema_rows(tmp_path, capsys):
    out = tmp_path / "results" / "kernels.csv"
    assert main(["bench", "--device", "cpu", "--quick", "--threads", "1", "--rounds", "2", "--widths", "16",
                 "--batches", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 thread (--threads; " in printed and "load average" in printed
    rows = benchresults.read(out)
    providers = {(r.case, r.provider) for r in rows}
    assert {("transform", "reference"), ("transform", "cpp"), ("greedy_step", "plain"), ("greedy_step", "dgl"),
            ("greedy_step", "bp"), ("greedy_step", "bp+checkpoint"), ("greedy_step", "gemm_floor"),
            ("greedy_step", "localprop:cpp")} <= providers
    assert all(r.median > 0 and r.threads == 1 and r.ratio is not None for r in rows)
    assert {r.ratio for r in rows if r.provider == r.baseline} == {1.0}


def test_model_path_on_a_tiny_resnet(tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["bench", "--model", f"{__name__}:tiny_resnet", "--input-shape", "3,12,12", "--batch", "4",
                 "--nodes", "2", "--rules", "bp", "greedy", "--rounds", "2", "--threads", "1", "--quiet",
                 "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "peak step MiB" in printed and "greedy" in printed
    rows = benchresults.read(out / "bench.csv")
    assert {(r.provider, r.metric) for r in rows} == {(p, m) for p in ("bp", "greedy")
                                                      for m in ("median_ms", "peak_mib")}
    assert all(r.median > 0 for r in rows) and all(r.shape == "input=3x12x12 batch=4 nodes=2" for r in rows)
    assert len(json.loads((out / "bench.json").read_text())) == len(rows)
    assert (out / "bench.png").stat().st_size > 0


# ---- errors -------------------------------------------------------------------------------
def test_unknown_baseline_is_a_clear_error(capsys):
    assert main(["bench", "--quick", "--step-only", "--baseline", "nope", "--widths", "8", "--batches", "4",
                 "--out", "/nonexistent/never-written.csv"]) == 2
    assert "baseline 'nope' is not a provider of greedy_step" in capsys.readouterr().err


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch")
def test_cuda_on_a_cpu_build_says_what_to_install(capsys):
    assert main(["bench", "--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "CPU build" in err and "install a CUDA build of torch" in err and "Assertion" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_absent_backend_gives_its_reason(capsys):
    assert main(["bench", "--device", "cpu", "--backends", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"localprop: error: backend 'cuda' is not available: " \
                  f"{backends.why_unavailable('cuda', torch.device('cpu'))}"
