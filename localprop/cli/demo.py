"""``localprop demo``: the same MLP on scikit-learn's digits trained by bp, bp+checkpoint
and greedy, and a small CNN made local with localize(); a table of test accuracy, wall
time and peak step memory per run, and a PNG."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import nn

import localprop as lp
from localprop import data, memory
from localprop.training import fit

MLP_RULES = ("bp", "bp+checkpoint", "greedy")
CNN_RULES = ("bp", "greedy")


def mlp(rule: str, width: int = 256, depth: int = 4) -> lp.LocalSequential:
    """An MLP of ``depth`` fused nodes for 64-pixel digits."""
    return lp.mlp([64] + [width] * (depth - 1) + [10], rule=rule,
                  optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def cnn() -> nn.Sequential:
    """A small CNN for 1x8x8 digits: three conv blocks and a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(64 * 16, 10))


def local_cnn(rule: str, example: torch.Tensor) -> lp.LocalSequential:
    return lp.localize(cnn(), rule=rule, num_classes=10, example_input=example,
                       optimizer=functools.partial(torch.optim.SGD, lr=0.02, momentum=0.9))


def runs(split_flat: data.Split, split_img: data.Split):
    """(label, factory, split) of every run of the demo."""
    for rule in MLP_RULES:
        yield f"MLP {rule}", functools.partial(mlp, rule), split_flat
    for rule in CNN_RULES:
        yield f"CNN {rule}", functools.partial(local_cnn, rule, split_img.x_train[:2]), split_img


def run(args) -> int:
    torch.manual_seed(args.seed)
    split_flat, split_img = data.digits(), data.digits(image=True)
    results = []
    for label, make, split in runs(split_flat, split_img):
        torch.manual_seed(args.seed)
        history = fit(make(), split, args.epochs, args.batch_size, args.seed, progress=not args.quiet, desc=label)
        x, y = split.x_train[:args.batch_size], split.y_train[:args.batch_size]
        mem = memory.measure_step(make(), x, y)
        results.append({"run": label, "test_accuracy": history.final_accuracy, "wall_seconds": history.wall_seconds,
                        "peak_step_bytes": mem.peak_bytes, "resident_bytes": mem.resident_bytes,
                        "accuracy_per_epoch": history.test_accuracy})
        if not args.quiet:
            print(f"{label:<18} test accuracy {history.final_accuracy:6.2%}  {history.wall_seconds:5.1f} s")
    print_table(results, args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "demo.png", args.batch_size)
    print(f"wrote {out / 'demo.json'} and {out / 'demo.png'}")
    return 0


def print_table(results: list[dict], batch_size: int) -> None:
    print(f"\n{'run':<18} {'test acc':>9} {'train s':>8} {'peak step KiB':>14} {'resident KiB':>13}")
    for r in results:
        print(f"{r['run']:<18} {r['test_accuracy']:>9.2%} {r['wall_seconds']:>8.1f} "
              f"{r['peak_step_bytes'] / 1024:>14.0f} {r['resident_bytes'] / 1024:>13.0f}")
    print(f"(peak step memory: allocator peak of one training step at batch {batch_size}, "
          "above the resident parameters and optimizer state)")


def plot(results: list[dict], path: Path, batch_size: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        epochs = range(1, len(r["accuracy_per_epoch"]) + 1)
        ax_acc.plot(epochs, [100 * a for a in r["accuracy_per_epoch"]], label=r["run"])
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="digits: test accuracy")
    ax_acc.set_ylim(80, 100)
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    names = [r["run"] for r in results]
    ax_mem.barh(names, [r["peak_step_bytes"] / 1024 for r in results], color="tab:orange")
    ax_mem.set(xlabel="KiB", title=f"peak step memory (batch {batch_size})")
    ax_mem.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def register(sub) -> None:
    p = sub.add_parser("demo", help="train on scikit-learn's digits with bp, bp+checkpoint and greedy")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out", help="folder for demo.json and demo.png (default: out)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
