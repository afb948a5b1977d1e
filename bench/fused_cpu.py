"""CPU benchmark of the fused greedy step against what it replaces.

For an MLP of 4 nodes (3 hidden ReLU nodes width -> width with a linear head each, and a
last node width -> 10) at batch 256, one greedy training step is timed four ways:

- ``fused``: LocalSequential.train_step on the "cpp" backend (check_finite off);
- ``fused``, backend ``reference``: the same step on the PyTorch reference ops;
- ``plain``: the loop a user would write: per node an autograd forward through Linear+ReLU
  and a Linear head, loss.backward(), SGD(momentum=0.9, foreach=True).step(), zero_grad,
  detach to the next node;
- ``gemm_floor``: only the GEMMs such a step cannot avoid (per node u Wᵀ, h Aᵀ, dlogits A,
  errᵀ u, dlogitsᵀ h), with torch.mm into preallocated outputs.

    python bench/fused_cpu.py [--widths 256 512 1024] [--rounds 15]

prints the medians and ratios and appends rows to bench/results/cpu_fused.csv (results schema,
localprop.benchresults).
"""
from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
from torch import nn

import localprop as lp
from common import append_rows, stamp, timings_ms

DEPTH, BATCH, CLASSES = 4, 256, 10
SGD = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, foreach=True)


def batch(width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, width, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen)


def fused_step(width: int, backend: str):
    """A no-argument callable taking one fused greedy step of the MLP on ``backend``."""
    torch.manual_seed(0)
    net = lp.mlp([width] * DEPTH + [CLASSES], rule="greedy", optimizer=SGD, backend=backend, check_finite=False)
    x, y = batch(width)
    return lambda: net.train_step(x, y)


def plain_step(width: int):
    """A no-argument callable taking the same greedy step with autograd and torch.optim."""
    torch.manual_seed(0)
    blocks = [nn.Linear(width, width) for _ in range(DEPTH - 1)] + [nn.Linear(width, CLASSES)]
    heads = [nn.Linear(width, CLASSES) for _ in range(DEPTH - 1)] + [None]
    opts = [SGD(list(b.parameters()) + (list(h.parameters()) if h else [])) for b, h in zip(blocks, heads)]
    x, y = batch(width)

    def step():
        u = x
        for block, head, opt in zip(blocks, heads, opts):
            h = block(u) if head is None else torch.relu(block(u))
            loss = F.cross_entropy(h if head is None else head(h), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            u = h.detach()
    return step


def gemm_floor(width: int):
    """A no-argument callable doing only the step's unavoidable GEMMs, into preallocated outputs."""
    r = functools.partial(torch.randn, dtype=torch.float32)
    u, w, a = r(BATCH, width), r(width, width), r(CLASSES, width)
    h, logits, g, dw, da = r(BATCH, width), r(BATCH, CLASSES), r(BATCH, width), r(width, width), r(CLASSES, width)
    w_last, logits_last, dw_last = r(CLASSES, width), r(BATCH, CLASSES), r(CLASSES, width)

    def step():
        for _ in range(DEPTH - 1):
            torch.mm(u, w.t(), out=h)               # transform
            torch.mm(h, a.t(), out=logits)          # head
            torch.mm(logits, a, out=g)              # goal error
            torch.mm(g.t(), u, out=dw)              # weight gradient
            torch.mm(logits.t(), h, out=da)         # head gradient
        torch.mm(u, w_last.t(), out=logits_last)    # last node: its output is the logits
        torch.mm(logits_last.t(), u, out=dw_last)
    return step


VARIANTS = {
    "fused_cpp": lambda width: fused_step(width, "cpp"),
    "fused_reference": lambda width: fused_step(width, "reference"),
    "plain": plain_step,
    "gemm_floor": gemm_floor,
}


def measure(width: int, rounds: int, per_round: int) -> list[dict]:
    """One row per variant at ``width``: the CSV columns, plus min_ms for the printout."""
    ms = timings_ms({name: make(width) for name, make in VARIANTS.items()}, rounds, per_round)
    plain, floor = ms["plain"][0], ms["gemm_floor"][0]
    env = stamp()
    return [{**env, "op": "greedy_step" if name != "gemm_floor" else "gemm_floor",
             "backend": name.removeprefix("fused_"), "width": width, "depth": DEPTH, "batch": BATCH,
             "dtype": "float32", "median_ms": round(t, 4), "ratio_vs_plain": round(t / plain, 3),
             "ratio_vs_gemm_floor": round(t / floor, 3), "min_ms": t_min} for name, (t, t_min) in ms.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=5)
    args = parser.parse_args()
    rows = [row for width in args.widths for row in measure(width, args.rounds, args.per_round)]
    print(f"{'width':>6} {'variant':>10} {'median ms':>10} {'vs plain':>9} {'vs GEMM floor':>14} {'min ms':>8}")
    for row in rows:
        print(f"{row['width']:>6} {row['backend']:>10} {row['median_ms']:>10.3f} {row['ratio_vs_plain']:>9.2f} "
              f"{row['ratio_vs_gemm_floor']:>14.2f} {row.pop('min_ms'):>8.3f}")
    print(f"appended to {append_rows('cpu_fused', rows)}")


if __name__ == "__main__":
    main()
