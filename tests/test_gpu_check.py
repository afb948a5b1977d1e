"""bench/gpu_check.py on CPU: everything of the GPU check that runs without a GPU.

The stages' plumbing (plan, dry run, stop at the first failure, time limits), the size
lists, the CSV and summary writers, the message on a machine without CUDA, and the bench
stage itself rehearsed on CPU backends at a tiny size.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from localprop import benchresults

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gc = _load()


def run_script(*args, env=None, timeout=60):
    """The script as `make gpu-check` runs it, in a child process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          env=full_env, timeout=timeout)


# ---- arguments and sizes -------------------------------------------------------------
def test_default_sizes_are_bounded_and_span_the_range():
    sizes = gc.sizes_for(gc.parse_args([]))
    assert 1 < len(sizes) <= gc.MAX_SIZES
    widths, batches = {w for w, _ in sizes}, {b for _, b in sizes}
    assert min(widths) == 512 and max(widths) == 8192
    assert min(batches) == 256 and max(batches) == 8192
    assert gc.MEMORY_SIZE in sizes


def test_quick_sizes_are_fewer_and_smaller():
    default, quick = gc.sizes_for(gc.parse_args([])), gc.sizes_for(gc.parse_args(["--quick"]))
    assert len(quick) < len(default)
    assert sum(w * w * b for w, b in quick) < sum(w * w * b for w, b in default) / 10


def test_sizes_option_wins_and_is_parsed():
    args = gc.parse_args(["--quick", "--sizes", "1024x256", "4096X4096"])
    assert gc.sizes_for(args) == [(1024, 256), (4096, 4096)]


@pytest.mark.parametrize("bad", ["1024", "axb", "1024x0", "16384x256", "1x2x3"])
def test_bad_sizes_are_refused(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        gc.parse_args(["--sizes", bad])
    assert exc.value.code == 2
    assert "--sizes" in capsys.readouterr().err


def test_too_many_sizes_are_refused(capsys):
    with pytest.raises(SystemExit):
        gc.parse_args(["--sizes", *["512x256"] * (gc.MAX_SIZES + 1)])
    assert f"at most {gc.MAX_SIZES}" in capsys.readouterr().err


def test_timeout_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        gc.parse_args(["--timeout", "0"])
    assert "--timeout" in capsys.readouterr().err


def test_out_defaults_to_env_out_then_out_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gc.parse_args([]).out == tmp_path
    monkeypatch.delenv("OUT")
    monkeypatch.chdir(tmp_path)
    assert gc.parse_args([]).out == tmp_path / "out" / "gpu"  # absolute: the stages run elsewhere
    assert gc.parse_args(["--out", "x"]).out == tmp_path / "x"


def test_memory_size_prefers_4096_else_a_moderate_listed_size():
    assert gc.memory_size(gc.DEFAULT_SIZES) == (4096, 4096)
    assert gc.memory_size([(512, 256), (2048, 2048)]) == (2048, 2048)
    assert gc.memory_size([(8192, 8192), (1024, 512)]) == (1024, 512)
    assert gc.memory_size([(8192, 8192)]) == (8192, 8192)


# ---- the plan ------------------------------------------------------------------------
def test_plan_lists_every_stage_in_order(tmp_path):
    args = gc.parse_args(["--out", str(tmp_path)])
    assert [s.name for s in gc.plan(args)] == ["env", "build", "tests", "bench"]
    assert [s.name for s in gc.plan(gc.parse_args(["--skip-build"]))] == ["env", "tests", "bench"]


def test_build_targets_only_the_present_gpu():
    build = gc.build_stage((9, 0))
    assert build.env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert build.env["MAX_JOBS"] == str(os.cpu_count())
    assert "LOCALPROP_NO_EXTENSION" in build.unset
    # an install: only an installed package maps localprop.kernels to the top-level kernels/
    assert build.commands[0][1:4] == ["-m", "pip", "install"] and build.commands[0][-2:] == ["-e", "."]
    assert {"--no-index", "--no-deps", "--no-build-isolation"} <= set(build.commands[0])


def test_tests_stage_has_a_per_test_timeout_and_junit(tmp_path):
    cmd = gc.pytest_command(tmp_path)
    assert cmd[cmd.index("-m", 3) + 1] == "gpu"
    assert f"--junitxml={tmp_path / 'junit.xml'}" in cmd
    assert f"faulthandler_timeout={gc.TEST_TIMEOUT}" in cmd
    has_plugin = importlib.util.find_spec("pytest_timeout") is not None
    assert (f"--timeout={gc.TEST_TIMEOUT}" in cmd) == has_plugin


@pytest.mark.parametrize("has_xdist", [True, False])
def test_tests_run_across_xdist_workers_when_it_is_installed(tmp_path, monkeypatch, has_xdist):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(gc.importlib.util, "find_spec",
                        lambda name: (object() if has_xdist else None) if name == "xdist" else find_spec(name))
    cmd = gc.pytest_command(tmp_path)
    assert ("-n" in cmd) == has_xdist
    if has_xdist:
        assert int(cmd[cmd.index("-n") + 1]) == min(gc.MAX_TEST_WORKERS, os.cpu_count())


def test_gpu_stages_do_not_run_triton_interpreted():
    for stage in gc.plan(gc.parse_args([])):
        if stage.name != "build":
            assert "TRITON_INTERPRET" in stage.unset
            assert "TRITON_INTERPRET" not in gc.child_env(stage)


def test_dry_run_lists_every_stage_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    result = run_script("--dry-run", "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for name in ("[env]", "[build]", "[tests]", "[bench]"):
        assert name in text
    assert "pip install" in text and "-e ." in text and "TORCH_CUDA_ARCH_LIST=" in text
    assert "-m gpu" in text and "--junitxml=" in text
    assert "--stage bench" in text and "8192x8192" in text
    assert not out.exists()  # nothing was run or written


def test_dry_run_with_options(tmp_path):
    result = run_script("--dry-run", "--skip-build", "--quick", "--out", str(tmp_path / "o"))
    assert result.returncode == 0
    assert "[build]" not in result.stdout
    assert "--quick" in result.stdout and "2048x2048" in result.stdout and "8192x8192" not in result.stdout


# ---- running stages ----------------------------------------------------------------
def fake(name, code):
    return gc.Stage(name, f"fake {name}", [[sys.executable, "-c", code]], limit=30)


def test_stops_at_the_first_failing_stage_and_shows_its_log(tmp_path, capsys):
    marker = tmp_path / "third-ran"
    stages = [fake("one", "print('first fine')"),
              fake("two", "import sys; print('line a'); print('it broke here'); sys.exit(3)"),
              fake("three", f"open({str(marker)!r}, 'w')")]
    results = gc.run_stages(stages, tmp_path, budget=60)
    assert [(r.name, r.ok) for r in results] == [("one", True), ("two", False)]
    assert not marker.exists()
    assert "exit status 3" in results[1].message
    out = capsys.readouterr().out
    assert "stage two FAILED" in out and "it broke here" in out
    assert "line a\nit broke here\n" in (tmp_path / "logs" / "two.log").read_text()
    assert "first fine" in (tmp_path / "logs" / "one.log").read_text()


def test_failed_tests_do_not_stop_the_benchmark(tmp_path, capsys):
    marker = tmp_path / "bench-ran"
    tests = fake("tests", "import sys; print('2 failed'); sys.exit(1)")
    tests.blocking = False
    results = gc.run_stages([fake("env", "pass"), tests, fake("bench", f"open({str(marker)!r}, 'w')")], tmp_path, 60)
    assert [(r.name, r.ok) for r in results] == [("env", True), ("tests", False), ("bench", True)]
    assert marker.exists()
    assert "stage tests FAILED" in capsys.readouterr().out
    assert [s.blocking for s in gc.plan(gc.parse_args([]))] == [True, True, False, True]


def test_a_stage_past_its_limit_is_stopped(tmp_path):
    stage = fake("slow", "import time; print('started', flush=True); time.sleep(60)")
    stage.limit = 0.5
    (result,) = gc.run_stages([stage], tmp_path, budget=60)
    assert not result.ok and "timed out" in result.message
    assert "started" in result.log.read_text()


def test_the_whole_budget_bounds_the_stages(tmp_path):
    stage = fake("slow", "import time; time.sleep(60)")
    (result,) = gc.run_stages([stage], tmp_path, budget=0.5)
    assert not result.ok and "timed out" in result.message


def test_a_command_that_cannot_start_fails_its_stage(tmp_path):
    stage = gc.Stage("missing", "absent tool", [[str(tmp_path / "no-such-tool")]])
    (result,) = gc.run_stages([stage], tmp_path, budget=10)
    assert not result.ok and "could not start" in result.message


def test_next_stages_replace_the_rest_after_a_pass(tmp_path):
    seen = []
    later = fake("later", "print('later ran')")

    def after(result):
        seen.append(result.name)
        return [later] if result.name == "first" else []

    results = gc.run_stages([fake("first", "pass"), fake("placeholder", "raise SystemExit(9)")], tmp_path, 30, after)
    assert [r.name for r in results] == ["first", "later"] and all(r.ok for r in results)
    assert seen == ["first", "later"]


def test_without_cuda_the_check_says_so(tmp_path):
    """On this machine (no GPU) the env stage stops the check with a sentence, not a traceback."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    result = run_script("--out", str(tmp_path), "--skip-build", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode != 0
    assert "no CUDA device" in result.stdout and "Traceback" not in result.stdout + result.stderr
    assert "stage env FAILED" in result.stdout
    assert not (tmp_path / "logs" / "tests.log").exists()  # later stages never ran
    assert "env" in (tmp_path / "summary.md").read_text()


# ---- results files -----------------------------------------------------------------
ENV = {"device": "dev", "threads": 2, "versions": "torch=t triton=tr localprop=l", "git_sha": "abc",
       "date": "2024-01-01"}


def timed(case, provider, width, batch, dtype, ms, ratio=None):
    return gc.result(ENV, case, provider, gc.step_shape(width, batch), dtype, "median_ms", ms, ratio=ratio,
                     baseline="pytorch")


def test_rows_are_in_the_one_results_schema(tmp_path):
    path = tmp_path / "results.csv"
    rows = [timed("torch_loop", "pytorch", 512, 256, "fp32", 1.5, 1.0),
            timed("greedy_step", "cuda", 512, 256, "fp32", 0.75, 0.5)]
    benchresults.write(path, rows[:1])
    benchresults.write(path, rows[1:])  # appending keeps one header
    assert benchresults.read(path) == rows
    (back, _) = gc.read_rows(path)  # the driver reads them without torch, by column name
    assert back["shape"] == "width=512 batch=256 nodes=4" and back["metric"] == "median_ms"
    assert tuple(back) == benchresults.FIELDS


def test_summary_tables_read_back(tmp_path):
    shape = gc.step_shape(4096, 4096, gc.MEMORY_NODES)
    benchresults.write(tmp_path / "results.csv", [
        timed("torch_loop", "pytorch", 4096, 4096, "bf16", 2.0, 1.0),
        timed("greedy_step", "cuda", 4096, 4096, "bf16", 1.0, 0.5),
        timed("greedy_step_unchecked", "cuda", 4096, 4096, "bf16", 0.9, 0.45),
        timed("gemm_floor", "cublas", 4096, 4096, "bf16", 0.8, 0.4),
        gc.result(ENV, "step_memory", "bp", shape, "fp32", "peak_mib", 100.0, ratio=1.0, baseline="bp"),
        gc.result(ENV, "step_memory", "bp", shape, "fp32", "resident_mib", 10.0),
        gc.result(ENV, "step_memory", "greedy", shape, "fp32", "peak_mib", 10.0, ratio=0.1, baseline="bp"),
        gc.result(ENV, "step_memory", "greedy", shape, "fp32", "resident_mib", 11.0)])
    results = [gc.StageResult("env", True, 1.0, "ok", tmp_path), gc.StageResult("tests", False, 2.0, "boom", tmp_path)]
    text = gc.write_summary(tmp_path, results).read_text()
    assert "device dev, torch=t triton=tr localprop=l, git abc, 2024-01-01" in text
    assert "| cuda unchecked ms | GEMMs ms |" in text
    assert "| bf16 | 4096x4096 | 2.000 | 1.000 | 0.50 | 0.900 | 0.800 | 0.80 |" in text
    assert "| greedy | 16 | 4096x4096 | fp32 | 10.0 | 11.0 | 0.100 |" in text
    assert "| tests | FAILED: boom | 2.0 |" in text
    assert (tmp_path / "summary.md").exists()


def test_summary_without_rows_still_lists_the_stages(tmp_path):
    text = gc.write_summary(tmp_path, [gc.StageResult("env", False, 0.1, "no CUDA device", tmp_path)]).read_text()
    assert "| env | FAILED: no CUDA device | 0.1 |" in text


def test_summary_without_rows_names_the_machine_from_the_env_stage(tmp_path):
    info = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0", "git_sha": "abc123"}
    (tmp_path / "env.json").write_text(json.dumps(info))
    text = gc.write_summary(tmp_path, [gc.StageResult("build", False, 3.0, "exit status 1", tmp_path)]).read_text()
    assert "device NVIDIA H200, torch=2.11.0+cu130 triton=3.6.0, git abc123" in text


# ---- the bench stage, rehearsed on CPU ---------------------------------------------
@pytest.fixture
def one_thread():
    """One intra-op thread: on a loaded machine, OpenMP threads waiting on each other make
    these tiny steps hundreds of times slower; what is tested here is not their speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_bench_stage_rehearsed_on_cpu(tmp_path, capsys):
    """The same code as on a GPU, on CPU backends at a tiny size: every kind of row, the
    memory comparison, the summary and the plot."""
    rc = gc.main(["--stage", "bench", "--device", "cpu", "--backends", "reference", "cpp", "--sizes", "32x16",
                  "--dtypes", "fp32", "--quick", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().out
    rows = benchresults.read(tmp_path / "results.csv")
    kinds = {(r.case, r.provider, r.metric) for r in rows}
    assert {("torch_loop", "pytorch", "median_ms"), ("greedy_step", "reference", "median_ms"),
            ("greedy_step", "cpp", "median_ms"), ("greedy_step_unchecked", "cpp", "median_ms"),
            ("gemm_floor", "pytorch", "median_ms"),
            ("step_memory", "bp", "peak_mib"), ("step_memory", "greedy", "peak_mib"),
            ("step_memory", "greedy", "resident_mib")} <= kinds
    for r in rows:
        assert r.device and f"torch={torch.__version__}" in r.versions and r.git_sha and r.date
        if r.metric == "median_ms":
            assert r.p20 <= r.median <= r.p80 and r.ratio is not None and r.baseline == "pytorch"
    peak = {r.provider: r for r in rows if r.metric == "peak_mib"}
    assert peak["bp"].shape == gc.step_shape(32, 16, gc.MEMORY_NODES) and peak["bp"].ratio == 1.0
    assert peak["greedy"].median < peak["bp"].median
    gc.write_report(tmp_path, [gc.StageResult("bench", True, 1.0, "ok", tmp_path)])
    assert "| fp32 | 32x16 |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "gpu_check.png").stat().st_size > 0


@pytest.mark.usefixtures("one_thread")
def test_bench_stage_fails_when_a_backend_is_missing(tmp_path, capsys):
    rc = gc.main(["--stage", "bench", "--device", "cpu", "--backends", "cuda", "--sizes", "16x8",
                  "--dtypes", "fp32", "--quick", "--out", str(tmp_path)])
    assert rc == 1
    assert "backend cuda is not available" in capsys.readouterr().out
    assert benchresults.read(tmp_path / "results.csv")  # what could run still has its rows


def test_step_gemms_cover_every_node():
    gemms = gc.step_gemms(64, 32)
    assert len(gemms) == 5 * (gc.STEP_NODES - 1) + 2
    assert (32, 64, 64) in gemms and (64, 64, 32) in gemms
