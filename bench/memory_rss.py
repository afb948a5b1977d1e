"""Cross-check of lp.memory's CPU figure against the operating system's: the peak resident
set (RSS) of one training step, in a fresh process per (model, rule).

In each process: build the network, take two steps (the optimizer state and the
allocator's caches exist), reset the kernel's RSS high-water mark (``/proc/self/clear_refs``),
take one step inside ``lp.memory.track_peak``, and compare the two peaks above their
starting points: the counting allocator's (what lp.memory reports) and VmHWM − VmRSS (what
the process really touched, allocator slack included: glibc keeps freed small blocks in its
arenas; the children run with a fixed mmap threshold, see MALLOC).

    python bench/memory_rss.py          # Linux only

Rows go to bench/results/memory_rss.csv; the table is printed as Markdown.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODELS = ("mlp", "vgg", "resnet")
#: glibc's malloc with a fixed mmap threshold: by default it raises the threshold after
#: each free of an mmapped block (up to 32 MiB), so a step's tensors would come from the
#: heap it keeps between steps and the RSS would not show them; fixed at 64 KiB, every
#: tensor block of that size or more is mapped and unmapped with it
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
RULES = ("bp", "greedy")


def build(model: str, rule: str):
    """(network, x, y) of one case; the models of the README's memory tables."""
    import torch

    import localprop as lp
    from balance import vgg

    torch.manual_seed(0)
    sgd = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)
    if model == "mlp":
        x, y = torch.randn(1024, 1024), torch.randint(0, 10, (1024,))
        return lp.mlp([1024] * 16 + [10], rule=rule, optimizer=sgd), x, y
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    made = vgg() if model == "vgg" else lp.zoo.ResNet((1, 1, 1, 1), width=32)
    return lp.localize(made, rule, nodes=4, optimizer=sgd), x, y


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(model: str, rule: str) -> dict:
    """In this (fresh) process: the allocator's and the kernel's peak of one step, bytes."""
    import gc

    from localprop import memory

    net, x, y = build(model, rule)
    for _ in range(2):
        net.train_step(x, y)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _kib("VmRSS")
    with memory.track_peak("cpu") as peak:
        net.train_step(x, y)
    rss = (_kib("VmHWM") - before) * 1024
    return {"model": model, "rule": rule, "allocator_mib": peak.bytes / 2**20, "rss_mib": rss / 2**20,
            "rss_over_allocator": rss / peak.bytes}


def main() -> None:
    if len(sys.argv) == 3:  # the child: one case, a JSON line
        print(json.dumps(measure(sys.argv[1], sys.argv[2])))
        return
    rows = []
    for model in MODELS:
        for rule in RULES:
            out = subprocess.run([sys.executable, __file__, model, rule], capture_output=True, text=True, check=True,
                                 env={**os.environ, **MALLOC})
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({**row, **common.stamp()})
            print(f"  {model:<7} {rule:<7} allocator {row['allocator_mib']:8.1f} MiB  RSS {row['rss_mib']:8.1f} MiB "
                  f"({row['rss_over_allocator']:.3f})", flush=True)
    path = common.append_rows("memory_rss", rows)
    print("| model | rule | lp.memory MiB | RSS MiB | RSS / lp.memory |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['rule']} | {r['allocator_mib']:.1f} | {r['rss_mib']:.1f} | "
              f"{r['rss_over_allocator']:.3f} |")
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
