"""What check_finite=True costs per training step on CPU.

Each network is built twice from the same seed, with check_finite on and off, and one
greedy step of each is timed round-robin in one run (so that drift in the machine's load
falls on both alike); the overhead is (on - off) / off of the median step times:

- LocalSequential MLPs on the "cpp" backend: ``nodes`` LocalLinear nodes (width -> width,
  ReLU, the last width -> 10), batch 256;
- a localize()d small CNN (two conv blocks and a linear classifier, three nodes) on
  [256, 3, 16, 16] images.

Step-time differences of ~1% are near the noise of a shared machine, so the direct cost
of the checks is measured too, timed alone, as fractions of the step with the checks off:

- "checks": the input x and each node's scalar loss (localprop.errors.check_finite);
- "params": each node's parameters after its update, as the step checks them, one call
  per node over the parameters its optimizer steps (localprop.errors.check_parameters).

    OMP_NUM_THREADS=1 python bench/check_finite.py [--rounds 30] [--per-round 5]

prints the table and appends rows to bench/results/check_finite_params.csv
(check_finite.csv holds the rows measured before the parameter check, without its columns).
"""
from __future__ import annotations

import argparse
import functools

import torch
from torch import nn

import localprop as lp
from common import append_rows, stamp, timings_ms
from localprop.errors import check_finite, check_parameters

BATCH, CLASSES = 256, 10
SGD = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)


def mlp(width: int, nodes: int, check: bool) -> lp.LocalSequential:
    torch.manual_seed(0)
    return lp.mlp([width] * nodes + [CLASSES], rule="greedy", optimizer=SGD, backend="cpp", check_finite=check)


def cnn(check: bool) -> lp.LocalSequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 4 * 4, CLASSES))
    return lp.localize(model, rule="greedy", num_classes=CLASSES, optimizer=SGD, backend="cpp",
                       example_input=torch.zeros(2, 3, 16, 16), check_finite=check)


def batch(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, *shape, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen)


def checks_ms(net: lp.LocalSequential, x: torch.Tensor, rounds: int = 15, repeats: int = 100) -> dict[str, float]:
    """Median ms of the checks one greedy step of ``net`` (built) makes: "checks", x once
    and one scalar loss per node; "params", each node's stepped parameters."""
    loss = torch.tensor(1.0)
    stepped = [[p for group in node.optimizer.param_groups for p in group["params"]] for node in net.nodes]

    def checks():
        check_finite(x, "0", 0, "input x")
        for _ in net.nodes:
            check_finite(loss, "0", 0, "loss")

    def params():
        for node, group in zip(net.nodes, stepped):
            check_parameters(group, node, node.name, 0)
    return {name: median for name, (median, _) in
            timings_ms({"checks": checks, "params": params}, rounds, repeats).items()}


def measure(name: str, make, shape: tuple[int, ...], nodes: int, rounds: int, per_round: int) -> dict:
    x, y = batch(shape)
    nets = {check: make(check) for check in (True, False)}
    steps = {check: functools.partial(net.train_step, x, y) for check, net in nets.items()}
    ms = {check: median for check, (median, _) in timings_ms(steps, rounds, per_round).items()}
    env, alone = stamp(), checks_ms(nets[True], x)
    return {**env, "model": name, "nodes": nodes, "batch": BATCH, "backend": "cpp",
            "on_ms": round(ms[True], 4), "off_ms": round(ms[False], 4),
            "overhead_pct": round(100 * (ms[True] - ms[False]) / ms[False], 2),
            "checks_ms": round(alone["checks"], 5), "checks_pct": round(100 * alone["checks"] / ms[False], 3),
            "params_ms": round(alone["params"], 5), "params_pct": round(100 * alone["params"] / ms[False], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--per-round", type=int, default=5)
    args = parser.parse_args()
    cases = [(f"mlp{width}", functools.partial(mlp, width, nodes), (width,), nodes)
             for width in (256, 1024) for nodes in (4, 8)]
    cases.append(("cnn", cnn, (3, 16, 16), 3))
    rows = [measure(*case, args.rounds, args.per_round) for case in cases]
    print(f"{'model':>8} {'nodes':>5} {'on ms':>9} {'off ms':>9} {'overhead':>9} {'checks alone':>13} "
          f"{'params alone':>13}")
    for r in rows:
        print(f"{r['model']:>8} {r['nodes']:>5} {r['on_ms']:>9.3f} {r['off_ms']:>9.3f} {r['overhead_pct']:>8.2f}% "
              f"{r['checks_pct']:>12.3f}% {r['params_pct']:>12.3f}%")
    print(f"appended to {append_rows('check_finite_params', rows)}")


if __name__ == "__main__":
    main()
