"""Converged benchmark of the learning rules on MNIST-1D: every rule trained until its
validation curve is flat, test accuracy read at the epoch chosen on validation.

- MNIST-1D (generated offline by the mnist1d package); the last 10% of the training set is
  the validation split, the test set is only ever read, never used to choose;
- the 1-D CNN and the MLP of bench/rules/run.py (imported, not copied), at 8, 4 and 16 nodes;
- every rule at its registry defaults, SGD momentum 0.9, batch 128; pgl also with
  ``global_state="own"`` ("pgl-own") on the 8-node CNN;
- per (model, nodes, rule): an lr sweep on the first ``--sweep-seeds`` seeds (default 1: seed
  0; the best validation accuracy, mean over those seeds, wins), then the chosen lr on the
  other seeds (the sweep's runs at that lr are reused);
- a plateau is ``--patience`` epochs without the best validation accuracy rising by >=
  ``--min-delta`` points; at each of the first ``--drops`` plateaus every optimizer's lr
  (the nodes', heads' and the rule's own) is divided by 10 and training goes on; the next
  plateau, or the cap (CNN 150, MLP 100 epochs), ends the run.

Per (model, nodes, rule): test accuracy at the best-validation epoch (mean ± std over the
seeds), that validation accuracy, epochs trained, chosen lr; a learning-curve PNG per
(model, nodes) with each rule's validation accuracy per epoch, mean over the seeds.

    python bench/rules/converge.py                 # full grid, 8 then 4 then 16 nodes
    python bench/rules/converge.py --depths 8      # 8 nodes only

Times with one lr drop, the rules split over two processes side by side on a 2-core CPU
(``--rules bp greedy sgr sgr:lam=0.1`` and ``--rules critic bll pgl``): the CNN at 8 nodes
12 minutes, 4 nodes 10, 16 nodes 60 (two more runs shared the cores then); the MLP at all
three depths 25; ``--sweep-seeds 3`` on the 8-node CNN 60 (four runs on the two cores).
    python bench/rules/converge.py --quick         # smoke run, nothing written
    python bench/rules/converge.py --depths 4 8 --rules sgr:lam=0.1 sgr:distance=relative,lam=1
                                                   # a rule at other settings (here sgr's sweep)

Rows are appended to bench/results/rules_converged.csv after each (model, nodes), so an
interrupted run keeps what it finished; bench/results/rules_converged.md gets the tables,
one section per command (a run of other depths adds its own), and
bench/results/rules_converged/ the curves, <model>_<nodes>.png, drawn from curves.json (every
rule's latest curve per setting, so a run of a few rules keeps the others in the plot).
"""
from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from localprop import data  # noqa: E402
from localprop.training import fit  # noqa: E402


def _load_rules_bench():
    """bench/rules/run.py as a module (its models), under a name that shadows nothing."""
    spec = importlib.util.spec_from_file_location("rules_bench", Path(__file__).with_name("run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_rules_bench()
RULES = bench.RULES
OUT = common.RESULTS / "rules_converged"
CAP = {"cnn": 150, "mlp": 100}
DROP, DROPS = 0.1, 1  #: every lr times DROP at each of the first DROPS plateaus (see train)
BATCH, CHANNELS, VAL_FRACTION = 128, 16, 0.1


@dataclass
class Run:
    """One training run: per-epoch validation and test accuracy, and where it stopped."""
    val: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    seconds: float = 0.0
    diverged: bool = False
    #: the network's state_dict at the best validation epoch (kept on request)
    best_state: dict | None = None

    @property
    def best(self) -> int:
        """The epoch (0-based) of the best validation accuracy, the first if tied."""
        return max(range(len(self.val)), key=lambda e: (self.val[e], -e))


def splits() -> tuple[data.Split, torch.Tensor, torch.Tensor]:
    """(train/validation split for fit, x_test, y_test) of MNIST-1D [N, 1, 40]: the
    validation split is the training set's last 10%, so fit's "test" figures are validation."""
    full = data.mnist1d(channels=True)
    n_val = int(len(full.y_train) * VAL_FRACTION)
    trval = data.Split(full.x_train[:-n_val], full.y_train[:-n_val], full.x_train[-n_val:],
                       full.y_train[-n_val:], full.num_classes)
    return trval, full.x_test, full.y_test


def factory(model: str, depth: int, lr: float, example: torch.Tensor, heads: str | None = None):
    """rule -> a fresh network: run.py's CNN (16 channels; ``heads``: localize's heads=) or
    MLP (width 256 at 4 nodes, 128 deeper), He init beyond 4 nodes, as run.py builds them;
    the MLP sees the flat [N, 40]."""
    if model == "cnn":
        make = functools.partial(bench.cnn1d, depth=depth, channels=CHANNELS, example=example, lr=lr, heads=heads)
    else:
        make = functools.partial(bench.mlp, inputs=40, depth=depth, width=256 if depth <= 4 else 128, lr=lr)
    return bench.deep(make, depth)


class Flat(torch.nn.Module):
    """The MLP's input view: [N, 1, 40] -> [N, 40], outside the network so nodes are run.py's."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.flatten(1))

    def train_step(self, x, y):
        return self.net.train_step(x.flatten(1), y)

    def optimizers(self):
        return self.net.optimizers()


def train(net, trval: data.Split, x_test, y_test, seed: int, cap: int, patience: int, min_delta: float,
          drops: int, keep_best: bool = False) -> Run:
    """Epochs of fit() (validation after each) until the best validation accuracy has not
    risen by >= min_delta for ``patience`` epochs, ``drops`` times with every lr times DROP
    there (one drop raised every rule on the 8-node CNN, bp by 0.6 points, the local rules by
    0.7 to 6.4: a constant lr leaves their noisy steps unannealed), or ``cap`` epochs; test
    accuracy is recorded per epoch only to be read at the epoch validation chooses. With
    ``keep_best``, the run also keeps a copy of the network's state_dict at that epoch."""
    run, mark, since, left = Run(), -math.inf, 0, drops
    for epoch in range(cap):
        try:  # one epoch per call, each with its own shuffle
            history = fit(net, trval, 1, batch_size=BATCH, seed=seed * 1000 + epoch, progress=False)
        except FloatingPointError:  # a non-finite loss: the run ends, counted as diverged
            run.diverged = True
            break
        run.seconds += history.wall_seconds
        run.val.append(history.test_accuracy[-1])
        run.test.append(data.accuracy(net, x_test, y_test))
        if keep_best and run.best == epoch:
            run.best_state = copy.deepcopy(net.state_dict())
        if run.val[-1] >= mark + min_delta:
            mark, since = run.val[-1], 0
        else:
            since += 1
            if since >= patience:
                if not left:
                    break
                left, since = left - 1, 0
                for optimizer in net.optimizers():
                    for group in optimizer.param_groups:
                        group["lr"] *= DROP
    return run


def one(model, depth, rule, lr, seed, ctx) -> Run:
    """Train one (model, nodes, rule, lr, seed) and print a line for it."""
    torch.manual_seed(seed)
    net = factory(model, depth, lr, ctx["example"], ctx["heads"])(common.rule_of(rule))
    if model == "mlp":
        net = Flat(net)
    run = train(net, ctx["trval"], ctx["x_test"], ctx["y_test"], seed, CAP[model], ctx["patience"],
                ctx["min_delta"], ctx["drops"])
    if run.val:
        e = run.best
        print(f"{model} {depth} {rule:8s} lr={lr:<6g} seed={seed} epochs={len(run.val):3d} best@{e + 1:3d} "
              f"val={100 * run.val[e]:.1f} test={100 * run.test[e]:.1f} {run.seconds:.0f}s"
              f"{' DIVERGED' if run.diverged else ''}", flush=True)
    else:
        print(f"{model} {depth} {rule:8s} lr={lr:<6g} seed={seed} diverged in epoch 1", flush=True)
    return run


def setting(model: str, depth: int, rules: list[str], ctx) -> tuple[list[dict], dict[str, list[float]]]:
    """Sweep then seeds for every rule of one (model, nodes): (rows, rule -> mean val curve)."""
    rows, curves = [], {}
    for rule in rules:
        swept = range(min(ctx["sweep_seeds"], ctx["seeds"]))
        sweep = {lr: [one(model, depth, rule, lr, s, ctx) for s in swept] for lr in ctx["lrs"]}
        scored = {lr: -1.0 if any(r.diverged or not r.val for r in rs) else statistics.mean(max(r.val) for r in rs)
                  for lr, rs in sweep.items()}
        lr = max(scored, key=scored.get)
        runs = sweep[lr] + [one(model, depth, rule, lr, s, ctx) for s in range(len(swept), ctx["seeds"])]
        ok = [r for r in runs if r.val and not r.diverged]
        label = rule if ctx["heads"] is None else f"{rule} heads={ctx['heads']}"
        rows.append(row(model, depth, label, lr, runs, ok, scored, ctx))
        if ok:
            curves[label] = mean_curve([r.val for r in ok])
    return rows, curves


def row(model, depth, rule, lr, runs, ok, scored, ctx) -> dict:
    """The result row of one (model, nodes, rule) over its seeds' runs."""
    stamp = ctx["stamp"]
    tests = [r.test[r.best] for r in ok] or [float("nan")]
    vals = [r.val[r.best] for r in ok] or [float("nan")]
    epochs = [len(r.val) for r in runs]
    return {"date": stamp["date"], "model": f"CNN1d c{CHANNELS}" if model == "cnn" else
            f"MLP w{256 if depth <= 4 else 128}", "depth": depth, "rule": rule, "lr": lr,
            "sweep": ",".join(f"{k:g}:{100 * v:.1f}" if v >= 0 else f"{k:g}:diverged" for k, v in scored.items()),
            "seeds": len(runs), "sweep_seeds": min(ctx["sweep_seeds"], ctx["seeds"]), "batch": BATCH,
            "cap": CAP[model], "patience": ctx["patience"],
            "drops": ctx["drops"], "acc_mean": statistics.mean(tests), "acc_std": statistics.pstdev(tests) if ok else float("nan"),
            "val_mean": statistics.mean(vals), "epochs_mean": statistics.mean(epochs),
            "epochs_max": max(epochs), "best_epoch_mean": statistics.mean([r.best + 1 for r in ok] or [0]),
            "diverged": len(runs) - len(ok),
            "s_per_epoch": sum(r.seconds for r in runs) / max(1, sum(epochs)),
            **{k: stamp[k] for k in ("device", "threads", "versions", "git_sha")}}


def mean_curve(curves: list[list[float]]) -> list[float]:
    """Mean over seeds per epoch; a seed that stopped early holds its last value."""
    n = max(map(len, curves))
    return [statistics.mean(c[min(e, len(c) - 1)] for c in curves) for e in range(n)]


def merged_curves(model: str, depth: int, curves: dict[str, list[float]]) -> dict[str, list[float]]:
    """This run's curves of (model, nodes) merged into those earlier runs left in
    rules_converged/curves.json (a rule run again replaces its curve), saved back: so a
    run of a few rules redraws the setting's plot with every rule measured for it."""
    path = OUT / "curves.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    setting = {**saved.get(f"{model}_{depth}", {}), **curves}
    saved[f"{model}_{depth}"] = setting
    path.write_text(json.dumps(saved, indent=1, sort_keys=True))
    return setting


def plot(model_label: str, depth: int, curves: dict[str, list[float]], path: Path) -> None:
    """Validation accuracy per epoch per rule (mean over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rule, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), [100 * v for v in curve], label=rule)
    ax.set(xlabel="epoch", ylabel="validation accuracy %", title=f"MNIST-1D, {model_label}, {depth} nodes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(rows: list[dict]) -> str:
    """The per-run table, then model x nodes against rules (test acc at the chosen epoch)."""
    lines = ["| model | nodes | rule | lr (sweep: lr:best val %) | test acc % (mean ± std) | val acc % | "
             "epochs (mean, max) | best epoch (mean) | diverged | s/epoch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['depth']} | {r['rule']} | {r['lr']:g} ({r['sweep'].replace(',', ' ')}) | "
                     f"{100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f} | {100 * r['val_mean']:.1f} | "
                     f"{r['epochs_mean']:.0f}, {r['epochs_max']} | {r['best_epoch_mean']:.0f} | {r['diverged']} | "
                     f"{r['s_per_epoch']:.2f} |")
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    pivot = ["| model | nodes | " + " | ".join(rules) + " |", "|---|---|" + "---|" * len(rules)]
    for key in dict.fromkeys((r["model"], r["depth"]) for r in rows):
        cells = {r["rule"]: f"{100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f}" for r in rows
                 if (r["model"], r["depth"]) == key}
        pivot.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells.get(rule, "-") for rule in rules) + " |")
    return "\n".join(pivot) + "\n\n" + "\n".join(lines) + "\n"


def _seeds(n: int) -> str:
    return "seed 0" if n == 1 else f"seeds 0-{n - 1} (mean best validation accuracy)"


TITLE = "# Learning rules, trained to convergence (MNIST-1D)\n"
SECTION = "\n## Run: "


def write(rows: list[dict], new: list[dict], ctx, command: str) -> None:
    """Append the new rows to the CSV; in the Markdown, this command's section rewritten
    with all its rows so far, the sections of other commands (other depths) kept."""
    print("->", common.append_rows("rules_converged", new), flush=True)
    s = ctx["stamp"]
    path = common.RESULTS / "rules_converged.md"
    section = (f"`{command}`\n\n{s['date']}, {s['device']}, {s['threads']} threads, {s['versions']}, "
               f"git {s['git_sha']}. Validation: the last {VAL_FRACTION:.0%} of the training set; test accuracy "
               f"at the epoch of the best validation accuracy. Stop: no rise of the best validation accuracy "
               f"by >= {ctx['min_delta'] * 100:g} points in {ctx['patience']} epochs (a plateau), every lr divided by "
               f"{1 / DROP:g} at the first {ctx['drops']} plateau(s); cap {CAP}. lr swept over "
               f"{ctx['lrs']} on {_seeds(ctx['sweep_seeds'])} (chosen on validation), then {ctx['seeds']} seeds. "
               f"SGD momentum 0.9, batch {BATCH}; rules at registry defaults; heads: {ctx['heads'] or 'default'}; "
               f"pgl-own: PGL(global_state=\"own\"). Curves: "
               f"rules_converged/.\n\n" + markdown(rows))
    old = path.read_text().split(SECTION)[1:] if path.exists() else []
    kept = [part for part in old if not part.startswith(f"`{command}`\n")]
    path.write_text(TITLE + "".join(SECTION + part.rstrip("\n") + "\n" for part in kept + [section]))
    print("->", path, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[8, 4, 16])
    p.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=["cnn", "mlp"])
    p.add_argument("--rules", nargs="+", default=list(RULES))
    p.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sweep-seeds", type=int, default=1, help="seeds each lr of the sweep runs on")
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--drops", type=int, default=DROPS, help=f"plateaus with every lr times {DROP:g} before the stop")
    p.add_argument("--min-delta", type=float, default=0.002, help="as a fraction (0.002: 0.2 points)")
    p.add_argument("--heads", choices=["full"], help="the CNN's heads= (default: the pooled default heads); "
                   "rows name it after the rule, e.g. 'greedy heads=full'")
    p.add_argument("--quick", action="store_true", help="tiny run; prints, writes nothing")
    p.add_argument("--threads", type=int, default=1, help="torch threads (see run.py)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        CAP.update(cnn=2, mlp=2)
        args.lrs, args.seeds, args.patience, args.drops = args.lrs[:1], 1, 1, min(args.drops, 1)
    trval, x_test, y_test = splits()
    ctx = {"trval": trval, "x_test": x_test, "y_test": y_test, "example": trval.x_train[:2], "lrs": args.lrs,
           "seeds": args.seeds, "sweep_seeds": args.sweep_seeds, "patience": args.patience, "drops": args.drops,
           "min_delta": args.min_delta, "heads": args.heads, "stamp": common.stamp()}
    command = "python bench/rules/converge.py " + " ".join(sys.argv[1:])
    rows, start = [], time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    for depth in args.depths:
        for model in args.models:
            # pgl-own against pgl's shared state: on the 8-node CNN
            extra = ["pgl-own"] if (model, depth) == ("cnn", 8) and "pgl" in args.rules else []
            new, curves = setting(model, depth, args.rules + extra, ctx)
            rows += new
            print(f"== {model} {depth} nodes done, {time.perf_counter() - start:.0f}s", flush=True)
            if not args.quick:
                write(rows, new, ctx, command.strip())
                plot(new[0]["model"], depth, merged_curves(model, depth, curves), OUT / f"{model}_{depth}.png")
    if args.quick:
        print(markdown(rows))


if __name__ == "__main__":
    main()
