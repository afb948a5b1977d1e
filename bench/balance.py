"""Peak step memory of greedy local learning on a VGG-like CNN, nodes balanced by block
count, parameters or measured memory (``localize(balance=...)``), against bp and
bp+checkpoint on the same layers. Memory is counted at the allocator (localprop.memory),
so it does not depend on the machine's load.

    python bench/balance.py [--batch 128] [--nodes 4 8] [--channels-last] [--lean]

``--channels-last``: the model and the input in torch.channels_last, the memory format in
which oneDNN's convolution backward on CPU reorders nothing (in the default NCHW it copies
its input and output gradient to its own layout: 32 MiB for a 32-channel 32x32 map at
batch 128).

``--lean``: the local networks (and a bp row beside the plain one) built with
``localize(..., lean=True)``: each BatchNorm + ReLU as one localprop.lean.BatchNormReLU,
whose backward keeps one activation fewer at the start of a node. The ratios stay against
the plain bp.

Rows go to bench/results/balance_memory.csv.
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import localprop as lp  # noqa: E402
from localprop import memory  # noqa: E402

#: 8 conv blocks on 3x32x32, halving the resolution after every second one
WIDTHS = (32, 32, 64, 64, 128, 128, 256, 256)


def vgg() -> nn.Sequential:
    layers, c = [], 3
    for i, w in enumerate(WIDTHS):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        layers += [nn.MaxPool2d(2)] if i % 2 else []
        c = w
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 2 * 2, 10))


def peak_mib(rule: str, x, y, nodes: int | None = None, balance: str = "count", channels_last: bool = False,
             lean: bool = False) -> float:
    torch.manual_seed(0)
    model = vgg().to(memory_format=torch.channels_last) if channels_last else vgg()
    net = lp.localize(model, rule=rule, num_classes=10, nodes=nodes, balance=balance, example_input=x, lean=lean)
    gc.collect()
    return memory.measure_step(net, x, y).peak_bytes / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--nodes", type=int, nargs="+", default=[4, 8])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--lean", action="store_true", help="localize(lean=True): BatchNorm + ReLU as one lean layer")
    args = p.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    base = {rule: peak_mib(rule, x, y, channels_last=args.channels_last) for rule in ("bp", "bp+checkpoint")}
    if args.lean:
        base["bp lean"] = peak_mib("bp", x, y, channels_last=args.channels_last, lean=True)
    model = "vgg8" + " channels_last" * args.channels_last + " lean" * args.lean
    rows = [{"model": model, "batch": args.batch, "rule": rule, "nodes": "", "balance": "", "peak_mib": base[rule],
             "ratio_bp": base[rule] / base["bp"]} for rule in base]
    for nodes in args.nodes:
        for balance in ("count", "params", "memory"):
            peak = peak_mib("greedy", x, y, nodes, balance, args.channels_last, args.lean)
            rows.append({"model": model, "batch": args.batch, "rule": "greedy", "nodes": nodes, "balance": balance,
                         "peak_mib": peak, "ratio_bp": peak / base["bp"]})
    stamp = common.stamp()
    common.show("peak step memory (MiB above the resident state)", rows)
    print("appended to", common.append_rows("balance_memory", [{**stamp, **r} for r in rows]))


if __name__ == "__main__":
    main()
