"""Cost of gradient clipping on fused nodes: one greedy step of a 4-node MLP (width 1024,
batch 256, cpp backend, 1 thread) with and without ``max_grad_norm``, alternated round by
round in one process.

    python bench/clip.py [--width 1024] [--batch 256] [--rounds 21]

Prints the medians and their ratio with the load average; nothing is written.
"""
from __future__ import annotations

import argparse
import functools
import os

import torch

import localprop as lp
from common import timings_ms


def net(width: int, max_grad_norm: float | None) -> lp.LocalSequential:
    torch.manual_seed(0)
    return lp.mlp([width] * 4 + [10], rule="greedy", backend="cpp", check_finite=False,
                  max_grad_norm=max_grad_norm, optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=21)
    args = p.parse_args()
    torch.set_num_threads(1)
    x, y = torch.randn(args.batch, args.width), torch.randint(0, 10, (args.batch,))
    nets = {"no clipping": net(args.width, None), "max_grad_norm=1": net(args.width, 1.0)}
    times = timings_ms({name: functools.partial(n.train_step, x, y) for name, n in nets.items()}, args.rounds, 1)
    for name, (median, low) in times.items():
        print(f"{name:<16} median {median:8.2f} ms  min {low:8.2f} ms")
    ratio = times["max_grad_norm=1"][0] / times["no clipping"][0]
    print(f"clipping / none: {ratio:.3f} (load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
