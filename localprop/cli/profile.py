"""``localprop profile``: peak step memory of bp, bp+checkpoint and local rules, on deep
MLPs over depth and batch size, or on a model of one's own (``--model pkg.module:factory``);
a table, JSON and PNGs (with a model: the allocator's timeline of one step, bp against a
local rule)."""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

import localprop as lp
from localprop import memory
from localprop.hooked import output_tensor

DEFAULT_RULES = ("bp", "bp+checkpoint", "greedy")
#: the rules profiled on a model of one's own when --rules is not given
MODEL_RULES = ("bp", "bp+checkpoint", "greedy", "sgr", "critic", "pgl")
#: the same with --hooks (localize(hooks=True) trains these)
HOOKED_RULES = ("bp", "greedy", "pgl")


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


def model_batch(factory, shape: list[int] | None, tokens: list[int] | None, batch: int, device: str):
    """(x, y, loss) for a model: x random [batch, *shape] floats or token ids [batch, SEQ] in
    [0, VOCAB); y from what the model outputs: class labels for [B, C] and [B, T, C],
    float targets (loss "mse") otherwise."""
    if (shape is None) == (tokens is None):
        raise ValueError("--model: give --input-shape C,H,W (float inputs) or --tokens VOCAB,SEQ (token ids)")
    g = torch.Generator().manual_seed(0)
    if tokens is not None:
        if len(tokens) != 2 or min(tokens) < 1:
            raise ValueError(f"--tokens: expected VOCAB,SEQ (two integers >= 1), got {tokens}")
        x = torch.randint(0, tokens[0], (batch, tokens[1]), generator=g)
    else:
        x = torch.randn(batch, *shape, generator=g)
    torch.manual_seed(0)
    model = factory().to(device).eval()
    with torch.no_grad():
        out = model(x[:2].to(device))
    try:
        out = output_tensor(model, out)
    except TypeError as e:
        raise ValueError(f"--model: {e}") from None
    if out.dim() in (2, 3) and not out.shape[-1] < 2:
        y = torch.randint(0, out.shape[-1], (batch, *out.shape[1:-1]), generator=g)
        return x.to(device), y.to(device), "cross_entropy"
    return x.to(device), torch.randn(batch, *out.shape[1:], generator=g).to(device), "mse"


def model_options(args, x: torch.Tensor) -> tuple[dict, dict]:
    """localize()'s options from the command line: (for every rule, for the local rules
    only). ``lean`` changes the model's BatchNorms, so bp runs with them too; the split,
    checkpointing inside nodes and steps in the backward are a local network's."""
    every = {"lean": True} if args.lean else {}
    local = {"checkpoint": args.checkpoint, "step_in_backward": args.step_in_backward}
    if args.balance != "count":  # localize(hooks=True) refuses what it cannot do, by name
        local.update(balance=args.balance, example_input=x)
    return every, local


def channels_last(factory, x: torch.Tensor):
    """The factory's model and x in channels_last (4-D image inputs only)."""
    if x.dim() != 4:
        raise ValueError(f"--channels-last: expected image inputs --input-shape C,H,W, got a batch of shape "
                         f"{list(x.shape)}")
    return lambda: factory().to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)


def run_model(args) -> int:
    """--model: every rule on the user's model; table, JSON, a bar chart and a timeline."""
    from localprop.config import import_target

    factory = import_target("--model", args.model)
    x, y, loss = model_batch(factory, args.input_shape, args.tokens, args.batch, args.device)
    if args.channels_last:
        factory, x = channels_last(factory, x)
    every, local = model_options(args, x)
    rules = list(args.rules or (HOOKED_RULES if args.hooks else MODEL_RULES))
    first = next((r for r in rules if r not in ("bp", "bp+checkpoint")), None)
    results, kept = [], {}  # kept: the networks whose timelines are drawn, bp's and the first local rule's
    for rule in tqdm(rules, desc="profile", disable=args.quiet, leave=False):
        options = every if rule in ("bp", "bp+checkpoint") else {**every, **local}
        net = memory.model_network(factory, rule, args.nodes, loss=loss, hooks=args.hooks, **options)
        results.append(memory.measure_model_step(net, rule, x, y))
        if rule in ("bp", first):  # timelines from the networks measured: a memory balance runs once
            kept[rule] = net
    if "bp" not in kept:  # bp's line is the reference in the plot
        kept["bp"] = memory.model_network(factory, "bp", None, loss=loss, hooks=args.hooks, **every)
    lines = [memory.timeline(kept[rule], x, y) for rule in ("bp", first) if rule in kept]
    rows = [{"rule": m.rule, "nodes": args.nodes, "batch": args.batch, "model": args.model, **m.as_dict()}
            for m in results]
    bp = next((r["peak_bytes"] for r in rows if r["rule"] == "bp"), None)
    print(f"{args.model}, batch {args.batch}, {args.nodes} nodes for the local rules ({x.device}):")
    print(f"{'rule':<15} {'peak step MiB':>14} {'resident MiB':>13} {'vs bp':>7}")
    for r in rows:
        ratio = f"{r['peak_bytes'] / bp:7.2f}" if bp else "      -"
        print(f"{r['rule']:<15} {r['peak_bytes'] / 2**20:>14.2f} {r['resident_bytes'] / 2**20:>13.2f} {ratio}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(rows, indent=2))
    if first in kept and not args.hooks:  # which node sets the local step's peak
        peaks = ", ".join(f"{p / 2**20:.1f}" for p in memory.node_peaks(kept[first], lines[1]))
        print(f"{first}: each node's step peak, MiB: {peaks}")
    plot_model(rows, lines, out / "profile.png")
    print(f"wrote {out / 'profile.json'} and {out / 'profile.png'}")
    return 0


def plot_model(rows: list[dict], lines: list[memory.Timeline], path: Path) -> None:
    """Peak step memory per rule (bars) and the allocated bytes through one step (lines)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, steps) = plt.subplots(1, 2, figsize=(12, 4))
    bars.bar([r["rule"] for r in rows], [r["peak_bytes"] / 2**20 for r in rows])
    bars.set(ylabel="peak step memory (MiB)", title=f"{rows[0]['model']}, batch {rows[0]['batch']}")
    bars.tick_params(axis="x", rotation=30)
    for line in lines:
        span = max(1, len(line.bytes) - 1)
        steps.plot([i / span for i in range(len(line.bytes))], [b / 2**20 for b in line.peaks], label=line.rule)
    steps.set(xlabel="progress through one training step (allocator events)", ylabel="allocated (MiB)",
              title="memory through one step")
    steps.grid(alpha=0.3)
    steps.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    if args.model is not None:
        return run_model(args)
    rows = profile(args.rules or list(DEFAULT_RULES), args.depths, args.batches, args.width, args.in_features,
                   device=args.device, backend=args.backend, progress=not args.quiet)
    print_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "profile.png")
    print(f"wrote {out / 'profile.json'} and {out / 'profile.png'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("profile", help="peak step memory vs depth and batch: bp, bp+checkpoint, local rules")
    p.add_argument("--rules", nargs="+", default=None,
                   help=f"rules to profile (default: {' '.join(DEFAULT_RULES)}; with --model: {' '.join(MODEL_RULES)})")
    p.add_argument("--depths", nargs="+", type=int, default=[4, 8, 16, 32])
    p.add_argument("--batches", nargs="+", type=int, default=[256, 1024])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--in-features", type=int, default=784)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index> (default: cpu)")
    p.add_argument("--backend", default=None, help="backend of the fused ops (default: auto)")
    p.add_argument("--out", default="out", help="folder for profile.json and profile.png (default: out)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--model", default=None, metavar="PKG.MODULE:FACTORY",
                   help="profile a model of one's own, built by this zero-argument factory (e.g. "
                        "localprop.zoo:resnet18), localized by localprop.localize")
    p.add_argument("--input-shape", type=_ints, default=None, metavar="C,H,W",
                   help="per-sample shape of the model's float input (with --model)")
    p.add_argument("--tokens", type=_ints, default=None, metavar="VOCAB,SEQ",
                   help="the model takes token ids: vocabulary size and sequence length (with --model)")
    p.add_argument("--batch", type=int, default=128, help="batch size with --model (default 128)")
    p.add_argument("--nodes", type=int, default=4, help="nodes of the local rules with --model (default 4)")
    p.add_argument("--hooks", action="store_true",
                   help=f"with --model: localize through hooks on the model's own forward, for models torch.fx "
                        f"cannot trace such as HuggingFace's (rules {' '.join(HOOKED_RULES)})")
    p.add_argument("--balance", default="count", choices=("count", "params", "memory", "time"),
                   help="with --model: how the local rules' nodes are balanced (localize's balance=; default count)")
    p.add_argument("--checkpoint", action="store_true",
                   help="with --model: the local rules recompute each block inside its node's backward")
    p.add_argument("--step-in-backward", action="store_true",
                   help="with --model: the local rules step each parameter as its gradient arrives")
    p.add_argument("--lean", action="store_true",
                   help="with --model: BatchNorms whose backward keeps less (localize's lean=; every rule)")
    p.add_argument("--channels-last", action="store_true",
                   help="with --model and image inputs: the model and batch in channels_last (every rule)")
    p.set_defaults(func=run)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
