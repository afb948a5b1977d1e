"""What local learning adds to a model, node by node: :meth:`LocalSequential.describe`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeSummary:
    """One node: its shapes, its parameters and forward FLOPs per sample, and its head's."""
    name: str
    label: str                 #: where the node starts in the model ("from 'layer2'") or its block's class
    input_shape: tuple         #: per-sample input shape (as built; None where it varies)
    output_shape: tuple        #: per-sample output shape
    params: int
    head_params: int
    flops: int                 #: forward FLOPs per sample (multiply-adds count 2)
    head_flops: int
    step_peak: int | None = None  #: allocator peak (bytes) while the node's modules ran in a step, if measured


@dataclass(frozen=True)
class Summary:
    """Every node of a network, with totals; ``str()`` is a table."""
    nodes: list[NodeSummary]
    rule: str

    @property
    def params(self) -> int:
        return sum(n.params for n in self.nodes)

    @property
    def head_params(self) -> int:
        return sum(n.head_params for n in self.nodes)

    @property
    def flops(self) -> int:
        return sum(n.flops for n in self.nodes)

    @property
    def head_flops(self) -> int:
        return sum(n.head_flops for n in self.nodes)

    def __str__(self) -> str:
        measured = any(n.step_peak is not None for n in self.nodes)
        head = f"{'node':<5} {'starts':<24} {'input':<16} {'output':<16} {'params':>10} {'head params':>12} " \
               f"{'MFLOP/sample':>13} {'head MFLOP':>11}" + (f" {'step peak MiB':>14}" if measured else "")
        lines = [head, "-" * len(head)]
        for n in self.nodes:
            peak = f" {n.step_peak / 2**20:>14.1f}" if measured and n.step_peak is not None else ""
            lines.append(f"{n.name:<5} {n.label[:24]:<24} {_shape(n.input_shape):<16} {_shape(n.output_shape):<16} "
                         f"{n.params:>10,} {n.head_params:>12,} {n.flops / 1e6:>13.3f} {n.head_flops / 1e6:>11.3f}"
                         + peak)
        lines.append(f"rule {self.rule!r}: heads add {self.head_params:,} parameters "
                     f"({_share(self.head_params, self.params)} of the model's {self.params:,}) and "
                     f"{_share(self.head_flops, self.flops)} to a forward pass's FLOPs")
        return "\n".join(lines)


def _shape(shape) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"
