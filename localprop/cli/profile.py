"""``localprop profile``: peak step memory of bp, bp+checkpoint and local rules on deep
MLPs over depth and batch size; a table, JSON and a PNG."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

import localprop as lp
from localprop import memory

DEFAULT_RULES = ("bp", "bp+checkpoint", "greedy")


def deep_mlp(rule: str, width: int, depth: int, in_features: int, num_classes: int, backend: str | None = None):
    """``depth`` fused nodes: depth-1 hidden ReLU nodes of ``width`` and a linear output node
    (at depth 1, the output node alone, from ``in_features``)."""
    if depth < 1:
        raise ValueError(f"depth: expected an integer >= 1 (the number of nodes), received {depth}")
    return lp.mlp([in_features] + [width] * (depth - 1) + [num_classes], rule=rule, backend=backend,
                  optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9))


def profile(rules, depths, batches, width: int, in_features: int = 784, num_classes: int = 10,
            device: str = "cpu", backend: str | None = None, progress: bool = True) -> list[dict]:
    """One row per (rule, depth, batch): the measured StepMemory as a dict."""
    rows = []
    grid = [(r, d, b) for b in batches for d in depths for r in rules]
    for rule, depth, batch in tqdm(grid, desc="profile", disable=not progress, leave=False):
        torch.manual_seed(0)
        x = torch.randn(batch, in_features, device=device)
        y = torch.randint(0, num_classes, (batch,), device=device)
        net = deep_mlp(rule, width, depth, in_features, num_classes, backend).to(device)
        m = memory.measure_step(net, x, y)
        rows.append({"rule": rule, "depth": depth, "batch": batch, "width": width,
                     "backend": net.backend, **m.as_dict()})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'rule':<15} {'depth':>5} {'batch':>6} {'peak step MiB':>14} {'resident MiB':>13} {'vs bp':>7}")
    bp = {(r["depth"], r["batch"]): r["peak_bytes"] for r in rows if r["rule"] == "bp"}
    for r in rows:
        ref = bp.get((r["depth"], r["batch"]))
        ratio = f"{r['peak_bytes'] / ref:7.2f}" if ref else "      -"
        print(f"{r['rule']:<15} {r['depth']:>5} {r['batch']:>6} {r['peak_bytes'] / 2**20:>14.2f} "
              f"{r['resident_bytes'] / 2**20:>13.2f} {ratio}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for rule in dict.fromkeys(r["rule"] for r in rows):
            pts = sorted((r["depth"], r["peak_bytes"] / 2**20) for r in rows
                         if r["rule"] == rule and r["batch"] == batch)
            ax.plot(*zip(*pts), marker="o", label=rule)
        ax.set(xlabel="depth (nodes)", ylabel="peak step memory (MiB)", title=f"batch {batch}, width {rows[0]['width']}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    rows = profile(args.rules, args.depths, args.batches, args.width, args.in_features, device=args.device,
                   backend=args.backend, progress=not args.quiet)
    print_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "profile.png")
    print(f"wrote {out / 'profile.json'} and {out / 'profile.png'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("profile", help="peak step memory vs depth and batch: bp, bp+checkpoint, local rules")
    p.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES))
    p.add_argument("--depths", nargs="+", type=int, default=[4, 8, 16, 32])
    p.add_argument("--batches", nargs="+", type=int, default=[256, 1024])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--in-features", type=int, default=784)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index> (default: cpu)")
    p.add_argument("--backend", default=None, help="backend of the fused ops (default: auto)")
    p.add_argument("--out", default="out", help="folder for profile.json and profile.png (default: out)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
