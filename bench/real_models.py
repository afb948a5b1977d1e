"""Peak step memory and step time of the local rules on the models users bring, against
bp and bp with a checkpoint per block: a ResNet-18 (3x32x32) and a GPT-2-small-shaped
language model (8 layers, d = 256, sequence 256), written as plain nn.Modules
(localprop.zoo) and localized by lp.localize() into K nodes; and HuggingFace's GPT-2 of
the same shape ("hf-gpt2", localized with hooks=True; its bp+checkpoint is the model's
own gradient_checkpointing_enable()).

Memory: the allocator's peak of one step above the resident state (localprop.memory:
CPU counting allocator or the CUDA caching allocator; every kind of step a rule makes,
PGL's global one included). Time: the median of ``--rounds`` steps per contender,
alternated in one process so that drift in the machine's load falls on all alike, as a
ratio to bp's. Greedy runs at every K, as localize() makes it by default, with nodes
balanced by measured memory plus checkpointing inside the nodes (``balance="memory",
checkpoint=True``), and with those plus every option that lowers a step's peak
(``lean=True, step_in_backward=True``); the other rules at ``--rules-at`` K (default 4),
each a registry name or "name:key=value,..." (``--rules sgr:mode=finite_difference``).
``--channels-last`` runs every contender's model and images in channels_last.

    python bench/real_models.py [--models resnet18 gpt] [--nodes 2 4 8] [--device cpu] [--channels-last]

Rows go to bench/results/real_models.csv; the table is printed as Markdown.
"""
from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import localprop as lp  # noqa: E402
from localprop import memory, rules  # noqa: E402

LOCAL_RULES = ("greedy", "sgr", "critic", "pgl")
SGD = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)


def resnet_batch(batch: int, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    return lp.zoo.resnet18, (x.to(device), torch.randint(0, 10, (batch,), generator=g).to(device))


def gpt_batch(batch: int, device: str, seq: int = 256, vocab: int = 4096):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
    return functools.partial(lp.zoo.gpt, vocab=vocab, dim=256, layers=8, heads=4, context=seq), \
        (ids[:, :-1], ids[:, 1:])


def hf_gpt2_batch(batch: int, device: str, seq: int = 256, vocab: int = 4096):
    """HuggingFace's GPT2LMHeadModel of the same shape as "gpt" (built from a config, no
    weights; its embedding tied to its output, dropout off so that every contender runs
    the same arithmetic): torch.fx cannot trace it, so it is localized with hooks=True."""
    import transformers

    def factory():
        cfg = transformers.GPT2Config(n_layer=8, n_embd=256, n_head=4, vocab_size=vocab, n_positions=seq,
                                      use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
    return factory, (ids[:, :-1], ids[:, 1:])


MODELS = {"resnet18": (resnet_batch, 128), "gpt": (gpt_batch, 8), "hf-gpt2": (hf_gpt2_batch, 8)}
#: models localized through hooks on their own forward: their rules, and bp with the
#: checkpointing a user of that library would switch on (HuggingFace's per layer)
HOOKED = {"hf-gpt2"}
HOOKED_RULES = ("greedy", "pgl")


#: localize()'s options of the memory-balanced contenders
BALANCED = {"balance": "memory", "checkpoint": True}
LEANEST = {**BALANCED, "lean": True, "step_in_backward": True}


def contenders(nodes: list[int], rule_names, rules_at: int) -> list[tuple[str, object, int | None, dict]]:
    """(label, rule, K, localize()'s options) of every contender: bp, bp+checkpoint per
    block, greedy at each K (plain; memory-balanced with checkpointing inside nodes; and
    with lean BatchNorms and steps in the backward besides), the other rules at K =
    ``rules_at``."""
    out = [("bp", "bp", None, {}), ("bp+checkpoint", rules.BP(checkpoint=True, segment=1), None, {})]
    for k in nodes:
        out += [("greedy", "greedy", k, {}), ("greedy, memory-balanced + ckpt", "greedy", k, BALANCED),
                ("greedy, balanced + ckpt + lean + step in bw", "greedy", k, LEANEST)]
        if k == rules_at:
            out += [(name, common.rule_of(name), k, {}) for name in rule_names if name != "greedy"]
    return out


def hooked_contenders(nodes: list[int], rule_names, rules_at: int) -> list[tuple[str, object, int | None, dict]]:
    """The contenders of a model localized with hooks: bp, bp with the model's own
    checkpointing per layer, greedy at each K (plain, and with the model's checkpointing,
    which recomputes each layer inside its node's local backward), pgl at K = ``rules_at``.
    Their options: ``{"checkpoint": True}`` switches the model's own checkpointing on."""
    out = [("bp", "bp", None, {}), ("bp+checkpoint", "bp", None, {"checkpoint": True})]
    for k in nodes:
        out += [("greedy", "greedy", k, {}), ("greedy + model's checkpointing", "greedy", k, {"checkpoint": True})]
        if k == rules_at:
            out += [(name, name, k, {}) for name in rule_names if name in HOOKED_RULES[1:]]
    return out


def build(factory, rule, k, options, x, device, hooked=False, channels_last=False):
    torch.manual_seed(0)
    model = factory().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if hooked:
        if options.get("checkpoint"):
            model.activation_checkpointing_enable()
        return lp.localize(model, rule, nodes=k, hooks=True, optimizer=SGD)
    # the memory balance measures at the batch it is given: the step's own, whose peaks it is to balance
    return lp.localize(model, rule, nodes=k, optimizer=SGD,
                       example_input=x if options.get("balance") == "memory" else None, **options)


def run(model_name: str, nodes: list[int], rule_names, rules_at: int, rounds: int, device: str,
        batch: int | None, channels_last: bool = False) -> list[dict]:
    make, default_batch = MODELS[model_name]
    factory, (x, y) = make(batch or default_batch, device)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    rows, nets = [], {}
    hooked = model_name in HOOKED
    for label, rule, k, options in (hooked_contenders if hooked else contenders)(nodes, rule_names, rules_at):
        net = build(factory, rule, k, options, x, device, hooked, channels_last)
        steps = max(1, getattr(net.rule, "period", 1))
        m = memory.measure_step(net, x, y, steps=steps)
        key = (label, k)
        nets[key] = net
        rows.append({"model": model_name, "batch": x.shape[0], "rule": label,
                     "memory_format": "channels_last" if channels_last else "contiguous",
                     "nodes": k or (len(net.starts) + 1 if hooked else len(net.nodes)),
                     "peak_mib": m.peak_bytes / 2**20, "resident_mib": m.resident_bytes / 2**20})
        print(f"  {model_name} {label:<44} K={k or '-':<3} peak {m.peak_bytes / 2**20:9.1f} MiB", flush=True)
        gc.collect()
    times = alternate({key: (lambda n=net: n.train_step(x, y)) for key, net in nets.items()}, rounds)
    bp_peak, bp_time = rows[0]["peak_mib"], times[("bp", None)]
    for row, key in zip(rows, nets):
        row.update(step_s=times[key], time_vs_bp=times[key] / bp_time, memory_vs_bp=row["peak_mib"] / bp_peak,
                   **common.stamp(device))
    return rows


def alternate(steps: dict, rounds: int) -> dict:
    """Median seconds per call of each callable, alternated round by round."""
    times = {key: [] for key in steps}
    for _ in range(rounds):
        for key, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(ts) for key, ts in times.items()}


def markdown(rows: list[dict]) -> str:
    lines = ["| model (batch) | rule | K | peak step MiB | vs bp | step s | time vs bp |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} ({r['batch']}) | {r['rule']} | {r['nodes']} | {r['peak_mib']:.1f} | "
                     f"{r['memory_vs_bp']:.2f} | {r['step_s']:.2f} | {r['time_vs_bp']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--nodes", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--rules", nargs="+", default=list(LOCAL_RULES))
    p.add_argument("--rules-at", type=int, default=4, help="the K at which rules other than greedy run")
    p.add_argument("--rounds", type=int, default=2, help="timed steps per contender (default 2)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 128 ResNet, 8 GPT)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels-last", action="store_true",
                   help="every contender's model and images in channels_last (the ResNet's; the GPTs have none)")
    args = p.parse_args()
    rows = []
    for name in args.models:
        rows += run(name, args.nodes, args.rules, args.rules_at, args.rounds, args.device, args.batch,
                    args.channels_last)
    path = common.append_rows("real_models", rows)
    print(markdown(rows))
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
