"""Progressive inference on converged networks: how much of the full model's FLOPs a
sample needs when it leaves at the first node whose head is confident enough.

For each rule with heads (greedy, critic) on MNIST-1D's 1-D CNN at 4 and 8 nodes: the
network is trained as bench/rules/converge.py trains it (its models, splits and stopping
rule; the lr that benchmark chose on validation, below), then ``predict(x,
exit_threshold=t)`` is read on the validation split for thresholds t from 0.5 to 0.9999.
The threshold chosen is the one of fewest FLOPs whose validation accuracy is within 1
point of the full model's (every sample through every node); the test split is read only
at that threshold. FLOPs are predict()'s ``flops_fraction``: the nodes and heads a sample
ran, as a fraction of one pass through every node.

    python bench/rules/progressive.py [--depths 8 4] [--rules greedy critic] [--seeds 3]

Rows go to bench/results/progressive.csv; each run adds its table to bench/results/progressive.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"rules_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


converge = _load("converge")
#: the lr bench/rules/converge.py chose on validation (bench/results/rules_converged.md; at 8
#: nodes its --sweep-seeds 3 run, at 4 nodes the sweep on seed 0)
LR = {("greedy", 8): 0.03, ("critic", 8): 0.03, ("greedy", 4): 0.03, ("critic", 4): 0.1}
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999)
TOLERANCE = 0.01  # one point of accuracy
TITLE = "# Progressive inference on converged networks (MNIST-1D, 1-D CNN)\n"


def accuracy_and_flops(net, x, y, threshold):
    """(accuracy, flops_fraction) of predict() on x at ``threshold`` (None: the full model)."""
    p = net.predict(x, exit_threshold=threshold)
    return float((p.labels == y).float().mean()), p.flops_fraction


def one(rule: str, depth: int, seed: int, ctx) -> dict:
    """Train one network to convergence, then choose its threshold on validation."""
    torch.manual_seed(seed)
    net = converge.factory("cnn", depth, LR[(rule, depth)], ctx["example"])(rule)
    run = converge.train(net, ctx["trval"], ctx["x_test"], ctx["y_test"], seed, converge.CAP["cnn"], 10, 0.002,
                         converge.DROPS)
    x_val, y_val = ctx["trval"].x_test, ctx["trval"].y_test
    full_val, _ = accuracy_and_flops(net, x_val, y_val, None)
    scored = {t: accuracy_and_flops(net, x_val, y_val, t) for t in THRESHOLDS}
    within = [t for t, (acc, _) in scored.items() if acc >= full_val - TOLERANCE]
    chosen = min(within, key=lambda t: scored[t][1]) if within else max(THRESHOLDS)
    full_test, _ = accuracy_and_flops(net, ctx["x_test"], ctx["y_test"], None)
    test, flops = accuracy_and_flops(net, ctx["x_test"], ctx["y_test"], chosen)
    print(f"{rule} {depth} seed={seed} epochs={len(run.val)} full test={100 * full_test:.1f} "
          f"t={chosen} test={100 * test:.1f} flops={flops:.3f} "
          f"(val: {' '.join(f'{t}:{100 * a:.1f}/{f:.2f}' for t, (a, f) in scored.items())})", flush=True)
    return {"full": full_test, "exit": test, "flops": flops, "threshold": chosen, "epochs": len(run.val)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[8, 4])
    p.add_argument("--rules", nargs="+", default=["greedy", "critic"], choices=["greedy", "critic"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    trval, x_test, y_test = converge.splits()
    ctx = {"trval": trval, "x_test": x_test, "y_test": y_test, "example": trval.x_train[:2]}
    stamp = common.stamp()
    rows, lines = [], ["| nodes | rule | full model test % | with exits test % | FLOPs fraction | threshold (chosen "
                       "on validation) | epochs |", "|---|---|---|---|---|---|---|"]
    for depth in args.depths:
        for rule in args.rules:
            runs = [one(rule, depth, seed, ctx) for seed in range(args.seeds)]
            mean = {k: statistics.mean(r[k] for r in runs) for k in ("full", "exit", "flops", "epochs")}
            std = {k: statistics.pstdev(r[k] for r in runs) for k in ("full", "exit", "flops")}
            rows.append({"model": "CNN1d c16", "depth": depth, "rule": rule, "lr": LR[(rule, depth)],
                         "seeds": args.seeds, "full_acc": mean["full"], "exit_acc": mean["exit"],
                         "exit_acc_std": std["exit"], "flops_fraction": mean["flops"],
                         "flops_std": std["flops"], **stamp})
            lines.append(f"| {depth} | {rule} | {100 * mean['full']:.1f} ± {100 * std['full']:.1f} | "
                         f"{100 * mean['exit']:.1f} ± {100 * std['exit']:.1f} | {mean['flops']:.2f} ± "
                         f"{std['flops']:.2f} | {', '.join(str(r['threshold']) for r in runs)} | "
                         f"{mean['epochs']:.0f} |")
    table = "\n".join(lines)
    print(table)
    print("->", common.append_rows("progressive", rows))
    command = "python bench/rules/progressive.py " + " ".join(sys.argv[1:])
    path = common.RESULTS / "progressive.md"
    old = path.read_text() if path.exists() else TITLE
    path.write_text(old.rstrip("\n") + "\n\n" +
                    f"## Run: `{command.strip()}`\n\n{stamp['date']}, {stamp['device']}, {stamp['versions']}, git "
                    f"{stamp['git_sha']}; {args.seeds} seeds; threshold: fewest FLOPs within {100 * TOLERANCE:g} "
                    f"point of the full model on validation.\n\n" + table + "\n")

if __name__ == "__main__":
    main()
