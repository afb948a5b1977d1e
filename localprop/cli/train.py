"""``localprop train``: config-driven training (a JSON or TOML file and/or flags; keys in
:mod:`localprop.config`), in one process or as a decoupled pipeline over several
(``--ranks N`` on this machine, or under ``torchrun``), with atomic checkpoints that a
``--resume`` continues exactly: the network with its optimizers and step count, the epoch,
the position in it, the batch generator's state at the epoch's start, the torch RNG state
and, distributed, each rank's outstanding backward messages."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from localprop import checkpoint, config, distributed, memory
from localprop.data import Split, accuracy


@dataclass
class Position:
    """Where training stands in the stream of batches."""
    generator: torch.Generator
    epoch: int = 0
    position: int = 0                  #: batches of this epoch already trained on
    epoch_start: torch.Tensor | None = None  #: the generator's state when this epoch began

    def extra(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "epoch_generator": self.epoch_start,
                "torch_rng": torch.get_rng_state()}

    def restore(self, extra: dict) -> None:
        self.epoch, self.position, self.epoch_start = extra["epoch"], extra["position"], extra["epoch_generator"]
        torch.set_rng_state(extra["torch_rng"])


def stream(split: Split, batch_size: int, epochs: int, pos: Position):
    """The training batches (x, y) from ``pos`` on; the caller counts ``pos.position``
    once a batch is trained on. Re-drawing an epoch's order from its start state and
    skipping the batches done leaves the generator exactly as an uninterrupted run."""
    while pos.epoch < epochs:
        if pos.epoch_start is None:
            pos.epoch_start = pos.generator.get_state()
        else:
            pos.generator.set_state(pos.epoch_start)
        for i, batch in enumerate(split.batches(batch_size, pos.generator)):
            if i >= pos.position:
                yield batch
        pos.epoch, pos.position, pos.epoch_start = pos.epoch + 1, 0, None


def total_steps(split: Split, cfg: dict) -> int:
    return cfg["epochs"] * -(-len(split.y_train) // cfg["batch_size"])


# ---- one process ------------------------------------------------------------------------
def run_single(cfg: dict, args) -> dict:
    split = config.dataset(cfg)
    net = config.network(cfg, split)
    pos = Position(torch.Generator().manual_seed(cfg["seed"]))
    if args.resume:
        pos.restore(checkpoint.load(_checkpoint_path(args), net))
    stop, peak, bar = _limit(split, cfg, args), 0, _bar(split, cfg, args, net.steps)
    start, _measured.seconds = time.perf_counter(), 0.0
    for x, y in stream(split, cfg["batch_size"], cfg["epochs"], pos):
        if net.steps >= stop:
            break
        with _measured(net, peak == 0) as measure:
            result = net.train_step(x, y)
        peak = measure.bytes or peak
        pos.position += 1
        bar.update(1)
        bar.set_postfix(loss=f"{list(result.losses.values())[-1]:.3f}", refresh=False)
        if args.checkpoint and args.checkpoint_every and net.steps % args.checkpoint_every == 0:
            checkpoint.save(args.checkpoint, net, **pos.extra())
    wall = time.perf_counter() - start - _measured.seconds
    bar.close()
    if args.checkpoint:
        checkpoint.save(args.checkpoint, net, **pos.extra())
    net.eval()
    return {"test_accuracy": accuracy(net, split.x_test, split.y_test), "steps": net.steps,
            "wall_seconds": wall, "ranks": 1, "peak_bytes_per_rank": [peak],
            "resident_bytes_per_rank": [sum(memory.resident(net))]}


class _measured:
    """Allocator peak of one step: the first step with optimizer state (steps >= 1), once."""

    def __init__(self, net, wanted: bool) -> None:
        self.on, self.bytes = wanted and net.steps >= 1, 0
        self.device = next(net.parameters()).device

    #: seconds spent in measured steps, which the profiler slows: taken out of wall time
    seconds = 0.0

    def __enter__(self):
        if self.on:
            self._start = time.perf_counter()
            self._cm = memory.track_peak(self.device)
            self._peak = self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        if self.on:
            self._cm.__exit__(*exc)
            self.bytes = self._peak.bytes
            _measured.seconds += time.perf_counter() - self._start
        return False


def _limit(split, cfg, args) -> int:
    return args.max_steps if args.max_steps is not None else total_steps(split, cfg)


def _bar(split, cfg, args, done: int):
    total = min(_limit(split, cfg, args), total_steps(split, cfg))
    return tqdm(total=total, initial=done, desc="train", unit="step", leave=False, mininterval=0.5,
                disable=args.quiet)


def _checkpoint_path(args, single: bool = True) -> str:
    """--checkpoint, checked for --resume: one process resumes from that file, the ranks
    of several from their sets beside it (see rank_checkpoint)."""
    if not args.checkpoint:
        raise config.ConfigError("--resume", "a --checkpoint PATH to resume from", None)
    if single and not Path(args.checkpoint).is_file():
        raise config.ConfigError("--checkpoint", "an existing checkpoint file to resume from", args.checkpoint)
    return args.checkpoint


# ---- one rank of several ---------------------------------------------------------------
def rank_checkpoint(path: str, rank: int, step: int) -> Path:
    """Rank ``rank``'s checkpoint of ``step``: ``<stem>.rank<r>.step<N><suffix>`` beside
    ``path``. A distributed checkpoint is the set of every rank's file of one step."""
    p = Path(path)
    return p.with_name(f"{p.stem}.rank{rank}.step{step}{p.suffix}")


def rank_steps(path: str, rank: int) -> list[int]:
    """The steps of rank ``rank``'s checkpoint files beside ``path``, ascending."""
    p = Path(path)
    pattern = re.compile(rf"{re.escape(p.stem)}\.rank{rank}\.step(\d+){re.escape(p.suffix)}")
    found = (pattern.fullmatch(f.name) for f in p.parent.glob(f"{p.stem}.rank{rank}.step*{p.suffix}"))
    return sorted(int(m.group(1)) for m in found if m)


def complete_step(path: str, steps_per_rank: list[list[int]], warn: bool = True) -> int:
    """The last step of which every rank wrote its checkpoint (a kill between the ranks'
    writes leaves a torn set: the ranks' newest files are of different steps). Warns when
    a newer, torn set is passed over; a ConfigError if no step is complete."""
    common = set(steps_per_rank[0]).intersection(*steps_per_rank[1:])
    have = "; ".join(f"rank {r}: {steps or 'none'}" for r, steps in enumerate(steps_per_rank))
    if not common:
        raise config.ConfigError("--checkpoint", f"a complete set of rank checkpoints to resume from ({have})", path)
    step = max(common)
    if warn and any(steps and steps[-1] > step for steps in steps_per_rank):
        print(f"localprop: warning: the newest checkpoints of {path} are an incomplete set ({have}); "
              f"resuming from step {step}, the last step every rank saved", file=sys.stderr)
    return step


def run_rank(cfg: dict, args) -> dict | None:
    """This process's rank of a pipeline; rank 0 returns the results, the others None.
    Everything that needs no peer (data, network, partition, step memory) comes before the
    process group is joined: see distributed.step_memory for why the measurement must."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    split = config.dataset(cfg)
    net = config.network(cfg, split)
    distributed.stage_for(net.rule)  # refuse a rule before any work
    counts = _counts(net, cfg, world)
    x, y = split.x_train[:cfg["batch_size"]], split.y_train[:cfg["batch_size"]]
    peak = distributed.step_memory(net, counts, rank, x if rank == 0 else None, y)
    distributed.init_from_env(cfg["distributed"]["timeout"])
    try:
        distributed.agree(_facts(cfg, args, split, counts, world))
        return _train_rank(cfg, args, split, net, counts, peak)
    finally:
        torch.distributed.destroy_process_group()


def _facts(cfg, args, split, counts, world) -> dict:
    """What every rank must agree on (see distributed.agree)."""
    digest = hashlib.sha256(split.y_train.numpy().tobytes() + str(list(split.x_train.shape)).encode()).hexdigest()
    return {"config": cfg, "training data (labels' digest and inputs' shape)": digest, "partition": counts,
            "world size": world, "command line": {"max_steps": args.max_steps, "resume": args.resume,
                                                  "checkpoint_every": args.checkpoint_every,
                                                  "checkpoint": args.checkpoint}}


def _train_rank(cfg, args, split, net, counts, peak):
    dcfg, rank, world = cfg["distributed"], torch.distributed.get_rank(), torch.distributed.get_world_size()
    pos, extra = Position(torch.Generator().manual_seed(cfg["seed"])), None
    if args.resume:
        steps = distributed.all_ranks(rank_steps(_checkpoint_path(args, single=False), rank), "checkpoint steps")
        step = complete_step(args.checkpoint, steps, warn=rank == 0)
        extra = checkpoint.load(rank_checkpoint(args.checkpoint, rank, step), net)
        if net.steps != step:
            raise config.ConfigError("--checkpoint", f"a rank file of step {step}",
                                     f"{rank_checkpoint(args.checkpoint, rank, step)} of step {net.steps}")
    pipe = distributed.Pipeline(net, counts, dcfg["mode"], dcfg["staleness"], dcfg["timeout"])
    if extra is not None:
        pipe.load_state(extra)
        pos.restore(extra)
    stop = _limit(split, cfg, args)
    bar = _bar(split, cfg, argparse.Namespace(**{**vars(args), "quiet": args.quiet or rank > 0}), net.steps)
    start = time.perf_counter()
    for x, y in stream(split, cfg["batch_size"], cfg["epochs"], pos):
        if net.steps >= stop:
            break
        pipe.step(x if rank == 0 else None, y)
        pos.position += 1
        bar.update(1)
        if args.checkpoint and args.checkpoint_every and net.steps % args.checkpoint_every == 0:
            _save_set(args.checkpoint, pipe, pos)
    if net.steps >= total_steps(split, cfg):
        pipe.finish()  # the run is complete: its last backward messages are absorbed
    if args.checkpoint:
        _save_set(args.checkpoint, pipe, pos)
    pipe.finish()  # a stop before the end still takes in what was sent, so that no sender waits
    wall = time.perf_counter() - start
    bar.close()
    # per rank: the step's peak, and what it holds (its own nodes, their optimizer state)
    stats = [torch.zeros(2, dtype=torch.int64) for _ in range(world)]
    torch.distributed.all_gather(stats, torch.tensor([peak, sum(memory.resident(net))]))
    pipe.gather()
    if rank > 0:
        return None
    net.eval()
    return {"test_accuracy": accuracy(net, split.x_test, split.y_test), "steps": net.steps, "wall_seconds": wall,
            "ranks": world, "partition": counts, "peak_bytes_per_rank": [int(s[0]) for s in stats],
            "resident_bytes_per_rank": [int(s[1]) for s in stats],
            "wait_seconds_rank0": pipe.wait_seconds}


def _save_set(path: str, pipe, pos: Position) -> None:
    """Every rank writes its file of this step; once all have (a step barrier), each
    removes its older files. A kill at any moment leaves at least one complete set: the
    older files go only after the newer set is whole."""
    net, rank, step = pipe.net, pipe.rank, pipe.net.steps
    with pipe.whole():
        checkpoint.save(rank_checkpoint(path, rank, step), net, **pos.extra(), **pipe.state())
    saved = distributed.all_ranks(step, "the checkpoint barrier")
    if any(s != step for s in saved):
        raise distributed.DistributedError(f"rank {rank}: the ranks saved checkpoints of different steps {saved}")
    for old in rank_steps(path, rank):
        if old != step:
            rank_checkpoint(path, rank, old).unlink(missing_ok=True)


def _counts(net, cfg, world) -> list[int]:
    """The partition: the config's list, or the split of the nodes' modelled costs
    (distributed.node_flops), the same on every rank and in every run."""
    given = cfg["distributed"]["partition"]
    if given == "cost":
        return distributed.partition(distributed.node_flops(net), world)
    if len(given) != world or sum(given) != len(net.nodes):
        raise config.ConfigError("distributed.partition",
                                 f"{world} node counts summing to the {len(net.nodes)} nodes", given)
    return given


# ---- the command ------------------------------------------------------------------------
def table(args) -> dict:
    """The config file's table overridden by the flags given."""
    table = config.read(args.config) if args.config else {}
    for key in ("dataset", "epochs", "batch_size", "seed", "backend"):
        if getattr(args, key) is not None:
            table[key] = getattr(args, key)
    if args.rule is not None:
        table["rule"] = {"name": args.rule, **_json("--rule-kwargs", args.rule_kwargs)}
    if args.optimizer is not None or args.lr is not None:
        opt = dict(config.DEFAULTS["optimizer"] if args.optimizer is None else {"name": args.optimizer})
        table["optimizer"] = {**opt, **({} if args.lr is None else {"lr": args.lr})}
    if args.model is not None:
        table["model"] = _model_flag(args.model, args.nodes, args.hooks)
    dist = {k: v for k, v in (("mode", args.mode), ("staleness", args.staleness), ("timeout", args.timeout))
            if v is not None}
    if dist:
        table["distributed"] = {**table.get("distributed", {}), **dist}
    return table


def _json(flag: str, text: str | None) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise config.ConfigError(flag, f"a JSON object ({exc})", text) from None
    if not isinstance(value, dict):
        raise config.ConfigError(flag, "a JSON object", value)
    return value


def _model_flag(text: str, nodes: int | None, hooks: bool = False) -> dict:
    """--model mlp:64,256,10 or --model module:function (with --nodes K, --hooks)."""
    if hooks and text.startswith("mlp:"):
        raise config.ConfigError("--hooks", "a --model module:function (an mlp: model has standalone nodes)", text)
    if text.startswith("mlp:"):
        try:
            return {"mlp": [int(w) for w in text[4:].split(",")]}
        except ValueError:
            raise config.ConfigError("--model", "mlp:<width>,<width>,... of integers", text) from None
    return {"module": text, **({} if nodes is None else {"nodes": nodes}), **({"hooks": True} if hooks else {})}


def run(args) -> int:
    cfg = config.resolve(table(args))
    if args.threads:
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.ranks > 1 and "RANK" not in os.environ:
        return _launch(cfg, args)
    result = run_rank(cfg, args) if world > 1 else run_single(cfg, args)
    if result is not None:
        _report(result, cfg, args)
    return 0


def _launch(cfg: dict, args) -> int:
    """--ranks N: the resolved config to a file, then N processes of this command on it,
    once everything a rank would refuse has been checked here."""
    _precheck(cfg, args)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(cfg))
        argv = ["--debug"] * args.debug + ["train", "--config", str(path), "--threads", str(args.threads or 1)]
        for flag, value in (("--json", args.json), ("--checkpoint", args.checkpoint),
                            ("--checkpoint-every", args.checkpoint_every), ("--max-steps", args.max_steps)):
            if value is not None:
                argv += [flag, str(value)]
        argv += ["--resume"] * args.resume + ["--quiet"] * args.quiet
        return distributed.launch(argv, args.ranks)


def _precheck(cfg: dict, args) -> None:
    """Refuse, before any rank starts, what every rank would refuse: the data, the model,
    a rule that cannot run distributed, a partition that does not fit, nothing to resume."""
    net = config.network(cfg, config.dataset(cfg))
    distributed.stage_for(net.rule)
    distributed.check_standalone(net)
    if len(net.nodes) < args.ranks:
        raise config.ConfigError("--ranks", f"at most one rank per node ({len(net.nodes)} nodes)", args.ranks)
    _counts(net, cfg, args.ranks)
    if args.resume:  # the ranks warn of a torn set passed over
        path = _checkpoint_path(args, single=False)
        complete_step(path, [rank_steps(path, r) for r in range(args.ranks)], warn=False)


def _report(result: dict, cfg: dict, args) -> None:
    if not args.quiet:
        peaks = ", ".join(f"{b / 1024:.0f}" for b in result["peak_bytes_per_rank"])
        held = ", ".join(f"{b / 1024:.0f}" for b in result["resident_bytes_per_rank"])
        print(f"test accuracy {result['test_accuracy']:.2%} after {result['steps']} steps, "
              f"{result['wall_seconds']:.1f} s on {result['ranks']} rank(s); peak step KiB per rank: {peaks}; "
              f"KiB held per rank (parameters, optimizer state): {held}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**result, "config": cfg}, indent=2))


def register(sub) -> None:
    p = sub.add_parser("train", help="config-driven training, checkpoints, --ranks N for several processes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a .json or .toml file of keys (see localprop.config); flags override it")
    p.add_argument("--dataset", help='digits, mnist1d, a .npz file or "module:function"')
    p.add_argument("--model", help='mlp:<in>,<widths>,...,<classes> or "module:function" (any nn.Module)')
    p.add_argument("--nodes", type=int, help="with --model module:function, the number of nodes K")
    p.add_argument("--hooks", action="store_true",
                   help="with --model module:function: train through hooks on the model's own forward "
                        "(localize(hooks=True): models torch.fx cannot trace; rules greedy, bp, pgl; one process)")
    p.add_argument("--rule", help="greedy, sgr, critic, bll, pgl, locprop, bp, bp+checkpoint")
    p.add_argument("--rule-kwargs", help='the rule\'s keyword arguments as JSON, e.g. \'{"lam": 0.1}\'')
    p.add_argument("--optimizer", choices=list(config.OPTIMIZERS))
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--backend", help="backend of the fused ops (default: auto)")
    p.add_argument("--json", help="write test_accuracy, steps, wall_seconds, peak step and resident bytes per rank here")
    p.add_argument("--checkpoint",
                   help="checkpoint file (with --ranks: one file per rank and step, <stem>.rank<r>.step<N><suffix>)")
    p.add_argument("--checkpoint-every", type=int, help="save every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue exactly from --checkpoint")
    p.add_argument("--max-steps", type=int, help="stop after this many steps in all (a later --resume goes on)")
    p.add_argument("--ranks", type=int, default=1, help="local processes of a decoupled pipeline (gloo)")
    p.add_argument("--mode", choices=list(config.DIST_MODES), help="distributed schedule (default sync)")
    p.add_argument("--staleness", type=int, help="async mode: steps a backward message is late (default 1)")
    p.add_argument("--timeout", type=float, help="seconds before a silent rank is an error (default 60)")
    p.add_argument("--threads", type=int, help="torch threads per process (default: torch's; 1 per rank)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    p.set_defaults(func=run)
