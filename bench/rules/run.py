"""Benchmark of the learning rules: bp, greedy, sgr, critic, bll, pgl (their registry
defaults) on the same models, 3 seeds each:

- digits (scikit-learn's bundled 8x8 images), MLP of fused LocalLinear nodes;
- MNIST-1D (generated offline by the mnist1d package), the same MLP and a small 1-D CNN
  made local with localize();
- depths of 4 and 16 nodes.

Per (dataset, model, depth, rule): test accuracy mean ± std over the seeds, peak step
memory (lp.memory.measure_step, one batch), training seconds per epoch, and for rules with
heads the progressive inference at threshold 0.9 (accuracy, fraction of the FLOPs).

    python bench/rules/run.py            # full run (12.5 minutes on one thread of a shared 2-core CPU)
    python bench/rules/run.py --quick    # smoke run, nothing written

Rows are appended to bench/results/rules.csv; bench/results/rules.md gets the table.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

import localprop as lp  # noqa: E402
from localprop import data, memory  # noqa: E402
from localprop.training import fit  # noqa: E402

RULES = ("bp", "greedy", "sgr", "critic", "bll", "pgl")


def he_init(net: lp.LocalSequential) -> lp.LocalSequential:
    """He-normal weights and zero biases: with nn.Linear's default init the signal of a
    16-layer plain ReLU net vanishes (bp stays at chance on digits, measured)."""
    for m in net.modules():
        if isinstance(m, (lp.LocalLinear, nn.Linear, nn.Conv1d)) and m.weight is not None:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


def mlp(rule: str, inputs: int, depth: int, width: int, lr: float) -> lp.LocalSequential:
    """``depth`` fused nodes: inputs -> width (x depth-1, ReLU) -> 10; the demo's MLP at depth 4."""
    return lp.mlp([inputs] + [width] * (depth - 1) + [10], rule=rule,
                  optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=0.9))


def cnn1d(rule: str, depth: int, channels: int, example: torch.Tensor, lr: float,
          heads: str | None = None) -> lp.LocalSequential:
    """``depth`` nodes on [1, 40] signals: depth-1 conv blocks (Conv1d k3 + ReLU; the 2nd
    and 4th halve the length) and a linear classifier, each its own node via localize()
    (``heads``: its heads= argument)."""
    layers, c_in, length = [], 1, 40
    for k in range(depth - 1):
        layers.append(nn.Sequential(nn.Conv1d(c_in, channels, 3, padding=1), nn.ReLU(),
                                    *([nn.MaxPool1d(2)] if k in (1, 3) else [])))
        c_in, length = channels, length // 2 if k in (1, 3) else length
    layers.append(nn.Sequential(nn.Flatten(), nn.Linear(channels * length, 10)))
    return lp.localize(layers, rule=rule, num_classes=10, example_input=example, heads=heads,
                       optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=0.9))


def deep(make, depth: int):
    """At depth 16: He init (see :func:`he_init`); depth 4 keeps the demo's defaults."""
    return make if depth <= 4 else lambda rule: he_init(make(rule))


def configs(args):
    """(dataset, model label, depth, split, factory rule -> net, epochs, batch) of every run.
    Depth 4: the demo's MLP (SGD lr 0.05, momentum 0.9) and a CNN at lr 0.05; depth 16:
    He init and lr 0.02 (at 0.05 greedy diverged on the 16-node MLP)."""
    digits, m1d, m1d_c = data.digits(), data.mnist1d(), data.mnist1d(channels=True)
    for depth in args.depths:
        width, lr = (256, 0.05) if depth <= 4 else (128, 0.02)
        yield "digits", f"MLP w{width}", depth, digits, \
            deep(functools.partial(mlp, inputs=64, depth=depth, width=width, lr=lr), depth), \
            args.epochs["digits"], args.batch["digits"]
        yield "mnist1d", f"MLP w{width}", depth, m1d, \
            deep(functools.partial(mlp, inputs=40, depth=depth, width=width, lr=lr), depth), \
            args.epochs["mnist1d"], args.batch["mnist1d"]
        yield "mnist1d", f"CNN1d c{args.channels}", depth, m1d_c, \
            deep(functools.partial(cnn1d, depth=depth, channels=args.channels, example=m1d_c.x_train[:2], lr=lr),
                 depth), args.epochs["cnn"], args.batch["mnist1d"]


def run_rule(rule: str, split: data.Split, make, epochs: int, seeds: int, batch: int) -> dict:
    accs, seconds, early, diverged = [], [], [], 0
    for seed in range(seeds):
        torch.manual_seed(seed)
        net = make(rule)
        try:
            history = fit(net, split, epochs, batch_size=batch, seed=seed, progress=False)
        except FloatingPointError:  # a non-finite loss: counted, left out of the means
            diverged += 1
            continue
        accs.append(history.final_accuracy)
        seconds.append(history.wall_seconds / epochs)
        if rule != "bp":
            pred = net.predict(split.x_test, exit_threshold=0.9)
            early.append((float((pred.labels == split.y_test).float().mean()), pred.flops_fraction))
    torch.manual_seed(0)
    mem = memory.measure_step(make(rule), split.x_train[:batch], split.y_train[:batch])
    if not accs:
        return {"acc_mean": float("nan"), "acc_std": float("nan"), "diverged": diverged, "peak_bytes": 0,
                "s_per_epoch": float("nan")}
    row = {"acc_mean": statistics.mean(accs), "acc_std": statistics.pstdev(accs), "diverged": diverged,
           "peak_bytes": mem.peak_bytes, "s_per_epoch": statistics.mean(seconds)}
    if early:
        row["exit0.9_acc"] = statistics.mean(a for a, _ in early)
        row["exit0.9_flops"] = statistics.mean(f for _, f in early)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| dataset | model | depth | rule | test acc % (mean ± std) | diverged | exit@0.9 acc % | "
             "exit@0.9 FLOPs | peak step KiB | s/epoch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        exit_acc = f"{100 * r['exit0.9_acc']:.1f}" if r.get("exit0.9_acc") != "" else "-"
        exit_flops = f"{r['exit0.9_flops']:.2f}" if r.get("exit0.9_flops") != "" else "-"
        lines.append(f"| {r['dataset']} | {r['model']} | {r['depth']} | {r['rule']} | "
                     f"{100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f} | {r['diverged']} | {exit_acc} | "
                     f"{exit_flops} | "
                     f"{r['peak_bytes'] / 1024:.0f} | {r['s_per_epoch']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny run; prints, writes nothing")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: these small steps gain nothing from a second thread, "
                        "and on shared cores OpenMP's waiting slowed them 10x)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.depths = (4, 16)
    args.seeds = 1 if args.quick else 3
    args.epochs = {"digits": 1, "mnist1d": 1, "cnn": 1} if args.quick else {"digits": 20, "mnist1d": 10, "cnn": 8}
    args.channels, args.batch = 16, {"digits": 64, "mnist1d": 128}
    stamp, rows = common.stamp(), []
    for dataset, model, depth, split, make, epochs, batch in configs(args):
        for rule in RULES:
            row = {"date": stamp["date"], "dataset": dataset, "model": model, "depth": depth, "rule": rule,
                   "epochs": epochs, "batch": batch, "seeds": args.seeds, "exit0.9_acc": "", "exit0.9_flops": ""}
            row.update(run_rule(rule, split, make, epochs, args.seeds, batch))
            row.update({"device": stamp["device"], "threads": stamp["threads"], "versions": stamp["versions"],
                        "git_sha": stamp["git_sha"]})
            rows.append(row)
            print(markdown([row]).splitlines()[-1], flush=True)
    if not args.quick:
        print("->", common.append_rows("rules", rows))
        path = common.RESULTS / "rules.md"
        path.write_text(f"# Learning rules benchmark\n\n{stamp['date']}, {stamp['device']}, {stamp['threads']} "
                        f"threads, {stamp['versions']}, git {stamp['git_sha']}; `python bench/rules/run.py`. "
                        f"{args.seeds} seeds, batch {args.batch}, epochs {args.epochs}. Peak step memory: "
                        f"allocator peak of one training step above the resident model (CPU).\n\n" + markdown(rows))
        print("->", path)


if __name__ == "__main__":
    main()
