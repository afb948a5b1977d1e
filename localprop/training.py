"""A small training loop over a :class:`~localprop.data.Split`, shared by the CLI and benchmarks."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .data import Split, accuracy


@dataclass
class History:
    """What :func:`fit` records."""
    test_accuracy: list[float] = field(default_factory=list)  #: after each epoch
    train_loss: list[float] = field(default_factory=list)     #: mean last-node loss per epoch
    wall_seconds: float = 0.0                                  #: training time, evaluation excluded

    @property
    def final_accuracy(self) -> float:
        return self.test_accuracy[-1]


def fit(net, split: Split, epochs: int, batch_size: int = 64, seed: int = 0,
        progress: bool = True, desc: str = "train") -> History:
    """Train ``net`` (anything with ``train_step(x, y)`` and ``__call__``) for ``epochs``
    epochs of shuffled batches; evaluate on the test split after each epoch."""
    history = History()
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False, unit="epoch")
    for _ in bar:
        net.train()
        start, losses = time.perf_counter(), []
        for x, y in split.batches(batch_size, gen):
            losses.append(list(net.train_step(x, y).losses.values())[-1])
        history.wall_seconds += time.perf_counter() - start
        net.eval()
        history.train_loss.append(sum(losses) / len(losses))
        history.test_accuracy.append(accuracy(net, split.x_test, split.y_test))
        bar.set_postfix(loss=f"{history.train_loss[-1]:.3f}", acc=f"{history.test_accuracy[-1]:.3f}")
    return history
