"""Benchmarks of the engine (reference backend unless --backend says otherwise):

1. peak step memory, greedy vs bp vs bp+checkpoint, on deep MLPs and localized CNNs;
2. test accuracy on digits, bp vs greedy, same MLP and budget as `localprop demo`;
3. step time, greedy vs bp, in one run.

    python bench/engine.py            # the full run quoted in the README
    python bench/engine.py --quick    # a smoke run

Rows go to bench/results/engine_memory.csv, engine_accuracy.csv and engine_time.csv.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import localprop as lp  # noqa: E402
from localprop import data, memory  # noqa: E402
from localprop.cli.demo import mlp  # noqa: E402
from localprop.cli.profile import deep_mlp  # noqa: E402
from localprop.training import fit  # noqa: E402

RULES = ("bp", "bp+checkpoint", "greedy")


def cnn(depth: int, channels: int) -> nn.Sequential:
    """``depth`` conv blocks of ``channels`` on 3x32x32 inputs, then a linear classifier."""
    layers = [nn.Conv2d(3, channels, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 32 * 32, 10))


def memory_rows(args) -> list[dict]:
    rows = []
    for width in args.widths:
        for depth in args.depths:
            x, y = torch.randn(args.batch, 784), torch.randint(0, 10, (args.batch,))
            for rule in RULES:
                torch.manual_seed(0)
                m = memory.measure_step(deep_mlp(rule, width, depth, 784, 10, args.backend), x, y)
                rows.append({"model": f"MLP w{width}", "depth": depth, "batch": args.batch, "rule": rule,
                             "peak_mib": m.peak_bytes / 2**20, "resident_mib": m.resident_bytes / 2**20})
    for depth in args.cnn_depths:
        x, y = torch.randn(args.cnn_batch, 3, 32, 32), torch.randint(0, 10, (args.cnn_batch,))
        for rule in RULES:
            torch.manual_seed(0)
            net = lp.localize(cnn(depth, 32), rule=rule, num_classes=10, example_input=x)
            m = memory.measure_step(net, x, y)
            rows.append({"model": "CNN c32", "depth": depth, "batch": args.cnn_batch, "rule": rule,
                         "peak_mib": m.peak_bytes / 2**20, "resident_mib": m.resident_bytes / 2**20})
    bp = {(r["model"], r["depth"]): r["peak_mib"] for r in rows if r["rule"] == "bp"}
    for r in rows:
        r["ratio_vs_bp"] = r["peak_mib"] / bp[(r["model"], r["depth"])]
    return rows


def accuracy_rows(args) -> list[dict]:
    split, rows = data.digits(), []
    for rule in ("bp", "greedy"):
        accs = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            accs.append(fit(mlp(rule), split, args.epochs, seed=seed, progress=False).final_accuracy)
        rows.append({"dataset": "digits", "model": "MLP 64-256-256-256-10", "rule": rule, "epochs": args.epochs,
                     "seeds": args.seeds, "acc_mean": statistics.mean(accs),
                     "acc_std": statistics.pstdev(accs), "acc_min": min(accs)})
    return rows


def time_rows(args) -> list[dict]:
    """Median step time of greedy and bp, interleaved in one run so both see the same machine."""
    rows = []
    for width in args.time_widths:
        x, y = torch.randn(256, width), torch.randint(0, 10, (256,))
        nets = {}
        for rule in ("bp", "greedy"):
            torch.manual_seed(0)
            nets[rule] = deep_mlp(rule, width, 8, width, 10, args.backend)
            nets[rule].train_step(x, y)
        times = {rule: [] for rule in nets}
        for _ in range(args.repeats):
            for rule, net in nets.items():
                start = time.perf_counter()
                net.train_step(x, y)
                times[rule].append(time.perf_counter() - start)
        bp_ms = statistics.median(times["bp"]) * 1e3
        for rule, t in times.items():
            ms = statistics.median(t) * 1e3
            rows.append({"model": f"MLP w{width} x8", "batch": 256, "rule": rule, "backend": nets[rule].backend,
                         "median_ms": ms, "ratio_vs_bp": ms / bp_ms})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--backend", default=None)
    args = p.parse_args()
    full = not args.quick
    args.widths = [512, 1024, 2048] if full else [64]
    args.depths = [8, 16, 32] if full else [4]
    args.batch = 1024 if full else 32
    args.cnn_depths = [4, 8] if full else [3]
    args.cnn_batch = 128 if full else 8
    args.epochs, args.seeds = (20, 3) if full else (1, 1)
    args.time_widths = [256, 1024] if full else [32]
    args.repeats = 30 if full else 3
    stamp = common.stamp()
    for name, rows in (("engine_memory", memory_rows(args)), ("engine_accuracy", accuracy_rows(args)),
                       ("engine_time", time_rows(args))):
        common.show(name, rows)
        if full:
            print("->", common.append_rows(name, [{**r, **stamp} for r in rows]))


if __name__ == "__main__":
    main()
