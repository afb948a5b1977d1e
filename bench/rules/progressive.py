"""Progressive inference on converged networks: how much of the full model's FLOPs a
sample needs when it leaves at the first node whose head is confident enough.

For each rule with heads (greedy, critic) on MNIST-1D's 1-D CNN at 4 and 8 nodes: the
network is trained as bench/rules/converge.py trains it (its models, splits and stopping
rule; the lr that benchmark chose on validation, below) and taken at its best validation
epoch, then ``predict(x, exit_threshold=...)`` is read on the validation split, two ways:

- one threshold for every node, t from 0.5 to 0.9999 (localprop.exits.CANDIDATES), or none
  (no exits: the full model);
- one per node (None: no exit there, its head not run), by coordinate descent from the
  chosen uniform threshold: each node in turn takes the value of fewest FLOPs that keeps
  validation within the tolerance, until a sweep changes nothing.

Both are ``net.choose_exits(x_val, y_val)`` (per_node False / True).

Chosen: the fewest FLOPs whose validation accuracy is within 1 point of the full model's
(every sample through every node); the test split is read only at the chosen thresholds.
FLOPs are predict()'s ``flops_fraction``: the nodes and heads a sample ran, as a fraction
of one pass through every node.

    python bench/rules/progressive.py [--depths 8 4] [--rules greedy critic] [--seeds 3]
    python bench/rules/progressive.py --depths 8 --heads full   # the heads at full resolution

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
LR = {("greedy", 8): 0.03, ("critic", 8): 0.03, ("greedy", 4): 0.03, ("critic", 4): 0.03}
#: the same with heads="full" (its --heads full --sweep-seeds 3 run at 8 nodes)
FULL_LR = {("greedy", 8): 0.05, ("critic", 8): 0.03}
TOLERANCE = 0.01  # one point of accuracy
TITLE = "# Progressive inference on converged networks (MNIST-1D, 1-D CNN)\n"


def accuracy_and_flops(net, x, y, threshold):
    """(accuracy, flops_fraction) of predict() on x at ``threshold`` (None: the full model)."""
    p = net.predict(x, exit_threshold=threshold)
    return float((p.labels == y).float().mean()), p.flops_fraction


def lr_of(rule: str, depth: int, heads: str | None) -> float:
    """The lr converge.py chose for (rule, nodes, heads); KeyError naming what it lacks."""
    table = LR if heads is None else FULL_LR
    if (rule, depth) not in table:
        raise KeyError(f"no lr chosen by bench/rules/converge.py for {rule} at {depth} nodes with heads={heads}: "
                       f"run it there, then add it to {'LR' if heads is None else 'FULL_LR'}")
    return table[(rule, depth)]


def one(rule: str, depth: int, seed: int, ctx) -> dict:
    """Train one network to convergence, take its best validation epoch, then choose its
    thresholds on validation (net.choose_exits), one for all nodes and one per node."""
    torch.manual_seed(seed)
    net = converge.factory("cnn", depth, lr_of(rule, depth, ctx["heads"]), ctx["example"], ctx["heads"])(rule)
    run = converge.train(net, ctx["trval"], ctx["x_test"], ctx["y_test"], seed, converge.CAP["cnn"], 10, 0.002,
                         converge.DROPS, keep_best=True)
    if run.best_state is None:  # no epoch finished: nothing to evaluate
        raise RuntimeError(f"{rule} at {depth} nodes, seed {seed}: diverged in its first epoch")
    net.load_state_dict(run.best_state)
    x_val, y_val = ctx["trval"].x_test, ctx["trval"].y_test
    uniform = net.choose_exits(x_val, y_val, TOLERANCE, per_node=False)
    each = net.choose_exits(x_val, y_val, TOLERANCE)
    full_test, _ = accuracy_and_flops(net, ctx["x_test"], ctx["y_test"], None)
    test, flops = accuracy_and_flops(net, ctx["x_test"], ctx["y_test"], uniform.thresholds)
    test_each, flops_each = accuracy_and_flops(net, ctx["x_test"], ctx["y_test"], each.thresholds)
    print(f"{rule} {depth} seed={seed} epochs={len(run.val)} best@{run.best + 1} full test={100 * full_test:.1f} "
          f"val={100 * uniform.full_accuracy:.1f} | t={uniform.thresholds[0]} val={100 * uniform.accuracy:.1f} "
          f"test={100 * test:.1f} flops={flops:.3f} | per node {each.thresholds} val={100 * each.accuracy:.1f} "
          f"test={100 * test_each:.1f} flops={flops_each:.3f}", flush=True)
    return {"full": full_test, "exit": test, "flops": flops, "threshold": uniform.thresholds[0],
            "epochs": len(run.val), "exit_each": test_each, "flops_each": flops_each}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[8, 4])
    p.add_argument("--rules", nargs="+", default=["greedy", "critic"], choices=["greedy", "critic"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--heads", choices=["full"], help="the CNN's heads= (default: the pooled default heads)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    trval, x_test, y_test = converge.splits()
    ctx = {"trval": trval, "x_test": x_test, "y_test": y_test, "example": trval.x_train[:2], "heads": args.heads}
    stamp = common.stamp()
    rows, lines = [], ["| nodes | rule | full model test % | one threshold: test % | FLOPs | threshold (chosen on "
                       "validation) | per node: test % | FLOPs | epochs |", "|---|---|---|---|---|---|---|---|---|"]
    for depth in args.depths:
        for rule in args.rules:
            runs = [one(rule, depth, seed, ctx) for seed in range(args.seeds)]
            figures = ("full", "exit", "flops", "exit_each", "flops_each")
            mean = {k: statistics.mean(r[k] for r in runs) for k in (*figures, "epochs")}
            std = {k: statistics.pstdev(r[k] for r in runs) for k in figures}
            label = rule if args.heads is None else f"{rule} heads={args.heads}"
            rows.append({"model": "CNN1d c16", "depth": depth, "rule": label, "lr": lr_of(rule, depth, args.heads),
                         "seeds": args.seeds, "full_acc": mean["full"], "exit_acc": mean["exit"],
                         "exit_acc_std": std["exit"], "flops_fraction": mean["flops"],
                         "flops_std": std["flops"], "per_node_exit_acc": mean["exit_each"],
                         "per_node_exit_acc_std": std["exit_each"], "per_node_flops_fraction": mean["flops_each"],
                         "per_node_flops_std": std["flops_each"], **stamp})
            lines.append(f"| {depth} | {label} | {100 * mean['full']:.1f} ± {100 * std['full']:.1f} | "
                         f"{100 * mean['exit']:.1f} ± {100 * std['exit']:.1f} | {mean['flops']:.2f} ± "
                         f"{std['flops']:.2f} | {', '.join(str(r['threshold']) for r in runs)} | "
                         f"{100 * mean['exit_each']:.1f} ± {100 * std['exit_each']:.1f} | {mean['flops_each']:.2f} ± "
                         f"{std['flops_each']:.2f} | {mean['epochs']:.0f} |")
    table = "\n".join(lines)
    print(table)
    print("->", common.append_rows("progressive", rows))
    command = "python bench/rules/progressive.py " + " ".join(sys.argv[1:])
    path = common.RESULTS / "progressive.md"
    old = path.read_text() if path.exists() else TITLE
    path.write_text(old.rstrip("\n") + "\n\n" +
                    f"## Run: `{command.strip()}`\n\n{stamp['date']}, {stamp['device']}, {stamp['versions']}, git "
                    f"{stamp['git_sha']}; {args.seeds} seeds; each network at its best validation epoch; thresholds: "
                    f"fewest FLOPs within {100 * TOLERANCE:g} point of the full model on validation (per node: "
                    f"coordinate descent, None = no exit at that node).\n\n" + table + "\n")

if __name__ == "__main__":
    main()
