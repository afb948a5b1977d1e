"""Benchmarks of LocProp (issue: networks as graphs with local propagation).

1. test accuracy on digits and MNIST-1D: sync/decoupled x transpose/feedback vs bp and greedy;
2. peak step memory against depth (4 to 1000 nodes) for bp, bp+checkpoint, greedy and
   decoupled locprop, with a plot;
3. learning time to a target test accuracy against bp;
4. the gain of running node updates concurrently in decoupled mode.

    python bench/locprop.py            # the full run quoted in the README
    python bench/locprop.py --quick    # a smoke run

Rows go to bench/results/locprop_*.csv; the plot to bench/results/locprop_memory.png.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import localprop as lp  # noqa: E402
from localprop import data, memory  # noqa: E402
from localprop.data import accuracy  # noqa: E402
from localprop.rules import LocProp  # noqa: E402
from localprop.training import fit  # noqa: E402

RULES = {
    "bp": lambda: "bp",
    "greedy": lambda: "greedy",
    "locprop sync transpose": lambda: LocProp(),
    "locprop sync feedback": lambda: LocProp(propagation="feedback"),
    "locprop decoupled transpose": lambda: LocProp(mode="decoupled"),
    "locprop decoupled feedback": lambda: LocProp(mode="decoupled", propagation="feedback"),
}
SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)


def accuracy_rows(args) -> list[dict]:
    rows = []
    for name, split in (("digits", data.digits()), ("mnist1d", data.mnist1d())):
        sizes = [split.x_train.shape[1]] + [256] * 3 + [10]
        for label, rule in RULES.items():
            accs, secs = [], []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                h = fit(lp.mlp(sizes, rule=rule(), optimizer=SGD), split, args.epochs[name], seed=seed, progress=False)
                accs.append(h.final_accuracy)
                secs.append(h.wall_seconds / args.epochs[name])
            rows.append({"dataset": name, "model": "MLP 4 nodes w256", "rule": label, "epochs": args.epochs[name],
                         "seeds": args.seeds, "acc_mean": statistics.mean(accs), "acc_std": statistics.pstdev(accs),
                         "s_per_epoch": statistics.mean(secs)})
    return rows


def memory_rows(args) -> list[dict]:
    rules = {"bp": "bp", "bp+checkpoint": "bp+checkpoint", "greedy": "greedy",
             "locprop decoupled": lambda: LocProp(mode="decoupled", propagation="feedback")}
    rows = []
    x, y = torch.randn(args.batch, args.width), torch.randint(0, 10, (args.batch,))
    for depth in args.depths:
        for label, rule in rules.items():
            torch.manual_seed(0)
            net = lp.mlp([args.width] * depth + [10], rule=rule() if callable(rule) else rule,
                         optimizer=functools.partial(torch.optim.SGD, lr=0.001))
            m = memory.measure_step(net, x, y)
            rows.append({"depth": depth, "width": args.width, "batch": args.batch, "rule": label,
                         "peak_mib": m.peak_bytes / 2**20, "resident_mib": m.resident_bytes / 2**20})
    bp = {r["depth"]: r["peak_mib"] for r in rows if r["rule"] == "bp"}
    for r in rows:
        r["bp_over_this"] = bp[r["depth"]] / r["peak_mib"]
    return rows


def plot_memory(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for rule in dict.fromkeys(r["rule"] for r in rows):
        pts = sorted((r["depth"], r["peak_mib"]) for r in rows if r["rule"] == rule)
        ax.plot(*zip(*pts), marker="o", label=rule)
    ax.set(xscale="log", yscale="log", xlabel="depth (nodes)", ylabel="peak step memory (MiB)",
           title=f"width {rows[0]['width']}, batch {rows[0]['batch']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_to_target_rows(args) -> list[dict]:
    """Wall seconds of training (evaluation excluded) until the test accuracy first reaches
    the target; evaluated every ``eval_every`` steps."""
    split = data.digits()
    rows = []
    for label in ("bp", "locprop sync transpose", "locprop sync feedback", "locprop decoupled feedback"):
        results = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            net = lp.mlp([64, 256, 256, 256, 10], rule=RULES[label](), optimizer=SGD)
            gen, spent, steps, reached = torch.Generator().manual_seed(seed), 0.0, 0, None
            while reached is None and steps < args.max_steps:
                for x, y in split.batches(64, gen):
                    start = time.perf_counter()
                    net.train_step(x, y)
                    spent += time.perf_counter() - start
                    steps += 1
                    if steps % args.eval_every == 0 and accuracy(net, split.x_test, split.y_test) >= args.target:
                        reached = (spent, steps)
                        break
            results.append(reached or (float("nan"), steps))
        rows.append({"dataset": "digits", "target": args.target, "rule": label, "seeds": args.seeds,
                     "seconds_median": statistics.median(r[0] for r in results),
                     "steps_median": statistics.median(r[1] for r in results)})
    return rows


def concurrency_rows(args) -> list[dict]:
    x, y = torch.randn(256, args.conc_width), torch.randint(0, 10, (256,))
    nets = {}
    for concurrent in (False, True):
        torch.manual_seed(0)
        nets[concurrent] = lp.mlp([args.conc_width] * args.conc_depth + [10],
                                  rule=LocProp(mode="decoupled", propagation="feedback", concurrent=concurrent),
                                  optimizer=functools.partial(torch.optim.SGD, lr=0.001))
        nets[concurrent].train_step(x, y)
    times = {c: [] for c in nets}
    for _ in range(args.repeats):
        for c, net in nets.items():
            start = time.perf_counter()
            net.train_step(x, y)
            times[c].append(time.perf_counter() - start)
    base = statistics.median(times[False])
    return [{"depth": args.conc_depth, "width": args.conc_width, "batch": 256, "concurrent": c,
             "median_ms": statistics.median(t) * 1e3, "speedup": base / statistics.median(t)}
            for c, t in times.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    full = not args.quick
    args.seeds = 3 if full else 1
    args.epochs = {"digits": 20, "mnist1d": 30} if full else {"digits": 1, "mnist1d": 1}
    args.depths = [4, 16, 64, 256, 1000] if full else [4, 16]
    args.width, args.batch = (256, 256) if full else (32, 16)
    args.target, args.eval_every, args.max_steps = 0.95, 10, 3000 if full else 20
    args.conc_depth, args.conc_width, args.repeats = (16, 1024, 20) if full else (4, 64, 3)
    stamp = common.stamp()
    mem = memory_rows(args)
    for name, rows in (("locprop_memory", mem), ("locprop_concurrency", concurrency_rows(args)),
                       ("locprop_time_to_target", time_to_target_rows(args)),
                       ("locprop_accuracy", accuracy_rows(args))):
        common.show(name, rows)
        if full:
            print("->", common.append_rows(name, [{**r, **stamp} for r in rows]))
    if full:
        plot_memory(mem, common.RESULTS / "locprop_memory.png")


if __name__ == "__main__":
    main()
