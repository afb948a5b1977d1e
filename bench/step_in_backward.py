"""Peak step memory of greedy local learning with each node's optimizer stepping after its
backward (the default) and inside it (``step_in_backward=True``: every parameter steps as
its gradient arrives and frees it), against bp, at the allocator (localprop.memory).

Where it should matter: nodes whose parameter gradients are large beside their
activations. Cases: an MLP of 16 Linear(1024, 1024) layers at batch 128 and 1024, 4 and 16
nodes; a GPT of 4 layers at d = 1024 (12.6 M parameters a layer), 2 sequences of 256
tokens, vocabulary 4096, 4 nodes; each with SGD (momentum 0.9) and Adam.

    python bench/step_in_backward.py [--cases mlp gpt]

Rows go to bench/results/step_in_backward.csv; the table is printed.
"""
from __future__ import annotations

import argparse
import functools
import gc
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import localprop as lp  # noqa: E402
from localprop import memory  # noqa: E402

OPTIMIZERS = {"sgd": functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
              "adam": functools.partial(torch.optim.Adam, lr=1e-4)}
WIDTH, LAYERS = 1024, 16


def mlp() -> nn.Sequential:
    return nn.Sequential(*[m for _ in range(LAYERS - 1) for m in (nn.Linear(WIDTH, WIDTH), nn.ReLU())],
                         nn.Linear(WIDTH, 10))


def mlp_cases():
    for batch in (128, 1024):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(batch, WIDTH, generator=g), torch.randint(0, 10, (batch,), generator=g)
        for nodes in (4, 16):
            yield f"mlp {LAYERS}x{WIDTH}", {"batch": batch, "nodes": nodes}, mlp, x, y


def gpt_cases():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (2, 257), generator=g)
    make = functools.partial(lp.zoo.gpt, vocab=4096, dim=1024, layers=4, heads=16, context=256)
    yield "gpt 4x1024", {"batch": 2, "nodes": 4}, make, ids[:, :-1], ids[:, 1:]


CASES = {"mlp": mlp_cases, "gpt": gpt_cases}


def peak_mib(make, x, y, optimizer, rule: str, nodes: int, inside: bool = False) -> float:
    torch.manual_seed(0)
    net = lp.localize(make(), rule, nodes=nodes, optimizer=OPTIMIZERS[optimizer], step_in_backward=inside,
                      example_input=x)
    gc.collect()
    return memory.measure_step(net, x, y).peak_bytes / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = p.parse_args()
    torch.set_num_threads(1)  # the figures are bytes; one thread keeps the workspaces alike
    rows = []
    for case in args.cases:
        for model, shape, make, x, y in CASES[case]():
            for optimizer in OPTIMIZERS:
                bp = peak_mib(make, x, y, optimizer, "bp", shape["nodes"])
                after = peak_mib(make, x, y, optimizer, "greedy", shape["nodes"])
                inside = peak_mib(make, x, y, optimizer, "greedy", shape["nodes"], inside=True)
                for run, peak in (("bp", bp), ("greedy", after), ("greedy, step in backward", inside)):
                    rows.append({"model": model, **shape, "optimizer": optimizer, "run": run, "peak_mib": peak,
                                 "ratio_greedy": peak / after})
    common.show("peak step memory (MiB above the resident state)", rows)
    print("appended to", common.append_rows("step_in_backward", [{**common.stamp(), **r} for r in rows]))


if __name__ == "__main__":
    main()
