"""What every benchmark script shares: the environment stamp of a result row, CSV output in
the one results schema (localprop.benchresults), paired timings and the rule a label names.

A script builds its rows as dicts of its own columns beside stamp()'s; append_rows turns
each into one schema row per measured figure, by the script's entry in SPECS: which column
names the provider (and the case), which are figures, which ratio goes with a figure. The
other columns are the case's parameters, written to ``shape`` as ``key=value``.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import localprop as lp
from localprop import benchresults

RESULTS = Path(__file__).resolve().parent / "results"
#: the columns stamp() adds, which go to the schema's own columns, not to ``shape``
STAMP = ("date", "device", "threads", "versions", "git_sha")


@dataclass(frozen=True)
class Spec:
    """How one script's rows map to the schema."""
    provider: str                       #: column naming the provider (a rule, backend, run)
    figures: tuple[str, ...]            #: columns holding measured figures, one schema row each
    case: str | None = None             #: column naming the case (default: the result's name)
    ratios: dict[str, str] = field(default_factory=dict)  #: figure column -> its ratio column
    baseline: str = ""                  #: the provider those ratios are to


SPECS = {
    "balance_memory": Spec("rule", ("peak_mib",), ratios={"peak_mib": "ratio_bp"}, baseline="bp"),
    "check_finite": Spec("backend", ("on_ms", "off_ms", "overhead_pct", "checks_ms", "checks_pct")),
    "check_finite_params": Spec("backend", ("on_ms", "off_ms", "overhead_pct", "checks_ms", "checks_pct",
                                            "params_ms", "params_pct")),
    "cpu_fused": Spec("backend", ("median_ms", "ratio_vs_gemm_floor"), case="op",
                      ratios={"median_ms": "ratio_vs_plain"}, baseline="plain"),
    "distributed": Spec("run", ("samples_per_s", "bubble", "peak_kib_per_rank", "single_bp_peak_kib"),
                        ratios={"samples_per_s": "speedup"}, baseline="single-process greedy"),
    "engine_accuracy": Spec("rule", ("acc_mean", "acc_std", "acc_min")),
    "engine_memory": Spec("rule", ("peak_mib", "resident_mib"), ratios={"peak_mib": "ratio_vs_bp"}, baseline="bp"),
    "engine_time": Spec("rule", ("median_ms",), ratios={"median_ms": "ratio_vs_bp"}, baseline="bp"),
    "locprop_accuracy": Spec("rule", ("acc_mean", "acc_std", "s_per_epoch")),
    "locprop_concurrency": Spec("concurrent", ("median_ms", "speedup")),
    "locprop_memory": Spec("rule", ("peak_mib", "resident_mib", "bp_over_this")),
    "locprop_time_to_target": Spec("rule", ("seconds_median", "steps_median")),
    "memory_rss": Spec("rule", ("allocator_mib", "rss_mib", "rss_over_allocator")),
    "real_models": Spec("rule", ("peak_mib", "resident_mib", "step_s", "time_vs_bp", "memory_vs_bp")),
    "step_in_backward": Spec("run", ("peak_mib",), case="model", ratios={"peak_mib": "ratio_greedy"},
                             baseline="greedy"),
    "rules_converged": Spec("rule", ("acc_mean", "acc_std", "val_mean", "epochs_mean", "epochs_max",
                                     "best_epoch_mean", "diverged", "s_per_epoch")),
    "progressive": Spec("rule", ("full_acc", "exit_acc", "exit_acc_std", "flops_fraction", "flops_std",
                                 "per_node_exit_acc", "per_node_exit_acc_std", "per_node_flops_fraction",
                                 "per_node_flops_std")),
    "rules": Spec("rule", ("acc_mean", "acc_std", "exit0.9_acc", "exit0.9_flops", "diverged", "peak_bytes",
                           "s_per_epoch")),
}


def stamp(device: str = "cpu") -> dict:
    """Columns that say where and with what a row was measured (benchresults.environment)."""
    return benchresults.environment(device)


def to_results(name: str, row: dict) -> list[benchresults.Result]:
    """The schema rows of one script row of result ``name`` (see SPECS): one per figure
    present; a figure given as several numbers (one per rank) gives one row per number,
    its place in ``shape`` as ``item=i``."""
    spec = SPECS[name]
    taken = {*STAMP, spec.provider, spec.case, "dtype", *spec.figures, *spec.ratios.values()}
    params = " ".join(f"{k}={v}".replace(" ", "_") for k, v in row.items() if k not in taken and v != "")
    provider = str(row[spec.provider])
    if provider in ("True", "False"):  # a switch: say which
        provider = f"{spec.provider}={provider}"
    common = {"case": str(row[spec.case]) if spec.case else name, "provider": provider,
              "dtype": str(row.get("dtype", "")), **{k: row.get(k, "") for k in STAMP}}
    out = []
    for figure in (f for f in spec.figures if row.get(f, "") != ""):
        ratio = row.get(spec.ratios.get(figure, ""), "")
        extra = {"ratio": float(ratio), "baseline": spec.baseline} if ratio != "" else {}
        values = str(row[figure]).split()
        for i, value in enumerate(values):
            shape = f"{params} item={i}" if len(values) > 1 else params
            out.append(benchresults.Result(**common, metric=figure, median=float(value), shape=shape.strip(),
                                           **extra))
    return out


def append_rows(name: str, rows: list[dict]) -> Path:
    """Append ``rows`` (a script's dicts, with stamp()'s columns) to bench/results/<name>.csv
    in the results schema."""
    return benchresults.write(RESULTS / f"{name}.csv", [r for row in rows for r in to_results(name, row)])


def timings_ms(steps: dict[str, Callable[[], object]], rounds: int, per_round: int) -> dict[str, tuple[float, float]]:
    """(median, min) time per call in ms of each callable, measured round-robin so that
    drift in the machine's load falls on every variant alike; each is warmed up first.
    The min goes beside the median because a shared machine adds heavy noise."""
    for fn in steps.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            times[name].append((time.perf_counter() - t0) / per_round * 1e3)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def show(title: str, rows: list[dict]) -> None:
    """Print rows as a plain table under a title."""
    print(f"\n{title}")
    keys = list(rows[0])
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys))


def rule_of(name: str):
    """The rule a label names: a registry name at its defaults, "pgl-own" the PGL with its
    own global state, or "name:key=value,..." the rule with those keyword arguments
    (numbers or strings: "sgr:distance=relative,lam=0.1")."""
    if name == "pgl-own":
        return lp.rules.PGL(global_state="own")
    if ":" not in name:
        return name
    rule, _, args = name.partition(":")
    kwargs = {}
    for item in args.split(","):
        key, _, value = item.partition("=")
        try:
            kwargs[key] = float(value)
        except ValueError:
            kwargs[key] = value
    return lp.rules.REGISTRY[rule](**kwargs)
