"""Throughput of the decoupled pipeline (localprop.distributed) with 1-4 gloo ranks on CPU,
against single-process local training and against backprop pipelined by
torch.distributed.pipelining (GPipe and 1F1B), on the same MLP of equal nodes.

Per run: samples/s, bubble fraction and peak step memory per rank (localprop.memory; for
localprop, distributed.step_memory on the rank's nodes, before the process group exists):
- localprop: the bubble is the measured fraction of each rank's wall time spent blocked
  waiting for a message (max over ranks);
- GPipe / 1F1B: the schedules' own bubble, (N-1)/(M+N-1) for N stages and M micro-batches
  (not measured: their idle time is inside torch's schedule).
Each rank runs one torch thread, so ranks do not oversubscribe the cores; ranks beyond
the cores present share them, which the cores column says.

    python bench/distributed.py                 # 4 nodes of 1024, batch 256, 60 steps
    python bench/distributed.py --quick         # a smoke run
    python bench/distributed.py --rule bll --mode async --ranks 1 2   # another rule, schedule

The torch pipelining baselines run with rule greedy only; other rules are compared with
their own single-process run.

Rows go to bench/results/distributed.csv.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import localprop as lp  # noqa: E402
from localprop import distributed, memory  # noqa: E402


def local_net(width: int, nodes: int, classes: int, rule: str = "greedy") -> lp.LocalSequential:
    torch.manual_seed(0)
    return lp.mlp([width] * nodes + [classes], rule=rule)


def plain_stages(width: int, nodes: int, classes: int, counts: list[int]) -> list[nn.Sequential]:
    """The same MLP as nn.Modules for torch's pipelining, split by ``counts``."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(nodes - 1)]
    blocks.append(nn.Linear(width, classes))
    out, start = [], 0
    for c in counts:
        out.append(nn.Sequential(*blocks[start:start + c]))
        start += c
    return out


def batches(args, steps: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.width, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    return [(x, y)] * steps


def single(args) -> dict:
    net = local_net(args.width, args.nodes, 10, args.rule)
    data = batches(args, args.steps + 2)
    for x, y in data[:2]:
        net.train_step(x, y)
    start = time.perf_counter()
    for x, y in data[2:]:
        net.train_step(x, y)
    wall = time.perf_counter() - start
    local_peak = memory.measure_step(net, *data[0], warmup=0).peak_bytes
    bp = memory.measure_step(_bp_net(args), *data[0]).peak_bytes
    return {"samples_per_s": args.steps * args.batch / wall, "bubble": 0.0, "peak_bytes": [local_peak],
            "bp_peak_bytes": bp}


def _bp_net(args):
    net = local_net(args.width, args.nodes, 10)
    net.rule = lp.rules.resolve("bp")
    return net


def _worker(rank: int, world: int, port: int, args, schedule: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    counts = distributed.partition(args.costs, world)
    x, y = batches(args, 1)[0]
    # before the group exists (see distributed.step_memory)
    peak = distributed.step_memory(local_net(args.width, args.nodes, 10, args.rule), counts, rank,
                                   x if rank == 0 else None, y) if schedule == "localprop" else None
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        run = _local if schedule == "localprop" else _pipelining
        out.put((rank, {**run(rank, world, counts, args, schedule), **({"peak": peak} if peak is not None else {})}))
    finally:
        dist.destroy_process_group()


def _local(rank, world, counts, args, schedule) -> dict:
    pipe = distributed.Pipeline(local_net(args.width, args.nodes, 10, args.rule), counts, args.mode, args.staleness)
    data = batches(args, args.steps + 2)
    for x, y in data[:2]:
        pipe.step(x, y)
    pipe.flush()
    dist.barrier()
    pipe.wait_seconds, start = 0.0, time.perf_counter()
    for x, y in data[2:]:
        pipe.step(x, y)
    pipe.flush()
    dist.barrier()
    wall = time.perf_counter() - start
    pipe.finish()
    return {"wall": wall, "bubble": pipe.wait_seconds / wall}


def _pipelining(rank, world, counts, args, schedule) -> dict:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    module = plain_stages(args.width, args.nodes, 10, counts)[rank]
    stage = PipelineStage(module, rank, world, torch.device("cpu"))
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    make = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    sched = make(stage, n_microbatches=args.microbatches, loss_fn=nn.functional.cross_entropy)
    x, y = batches(args, 1)[0]

    def step():
        if rank == 0:
            sched.step(x)
        elif rank == world - 1:
            sched.step(target=y)
        else:
            sched.step()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    dist.barrier()
    wall = time.perf_counter() - start
    with memory.track_peak("cpu") as peak:
        step()
    m, n = args.microbatches, world
    return {"wall": wall, "bubble": (n - 1) / (m + n - 1), "peak": peak.bytes}


def spawn(world: int, args, schedule: str) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = distributed.free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, schedule, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    walls = [results[r]["wall"] for r in range(world)]
    return {"samples_per_s": args.steps * args.batch / max(walls),
            "bubble": max(results[r]["bubble"] for r in range(world)),
            "peak_bytes": [results[r]["peak"] for r in range(world)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--microbatches", type=int, default=4, help="GPipe/1F1B micro-batches per batch")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--rule", default="greedy", help="the local rule (greedy, sgr, critic, bll, pgl, ...)")
    p.add_argument("--mode", choices=("sync", "async"), default="sync")
    p.add_argument("--staleness", type=int, default=1, help="steps, for --mode async")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.width, args.steps, args.ranks = 256, 10, [1, 2]
    torch.set_num_threads(1)
    # one partition for every run, from node costs measured once here (ranks timing
    # their own would disagree)
    args.costs = distributed.node_costs(local_net(args.width, args.nodes, 10, args.rule), *batches(args, 1)[0])
    base = single(args)
    rows = [_row(args, f"single-process {args.rule}", 1, base, base)]
    mode = "" if args.mode == "sync" else f" async s={args.staleness}"
    for world in args.ranks:
        rows.append(_row(args, f"localprop pipeline {args.rule}{mode}", world, spawn(world, args, "localprop"), base))
        if world > 1 and args.rule == "greedy":
            for schedule in ("gpipe", "1f1b"):
                rows.append(_row(args, f"bp {schedule} (torch pipelining)", world, spawn(world, args, schedule), base))
    print(f"{'run':<34} {'ranks':>5} {'samples/s':>10} {'x single':>8} {'bubble':>7} {'peak KiB per rank':>24}")
    for r in rows:
        print(f"{r['run']:<34} {r['ranks']:>5} {r['samples_per_s']:>10.0f} {r['speedup']:>8.2f} {r['bubble']:>7.2f} "
              f"{r['peak_kib_per_rank']:>24}")
    print(f"single-process bp peak step memory: {base['bp_peak_bytes'] / 1024:.0f} KiB; cores: {os.cpu_count()}")
    print(f"wrote {common.append_rows('distributed', rows)}")


def _row(args, run: str, ranks: int, result: dict, base: dict) -> dict:
    return {**common.stamp(), "run": run, "ranks": ranks, "cores": os.cpu_count(), "width": args.width,
            "nodes": args.nodes, "batch": args.batch, "steps": args.steps,
            "samples_per_s": round(result["samples_per_s"], 1),
            "speedup": round(result["samples_per_s"] / base["samples_per_s"], 3),
            "bubble": round(result["bubble"], 3),
            "peak_kib_per_rank": " ".join(str(b // 1024) for b in result["peak_bytes"]),
            "single_bp_peak_kib": base["bp_peak_bytes"] // 1024}


if __name__ == "__main__":
    main()
