"""Datasets that ship with a package or are generated offline (nothing is downloaded)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class Split:
    """A classification dataset split into train and test tensors."""
    x_train: torch.Tensor   #: float32 [N_train, ...]
    y_train: torch.Tensor   #: int64 [N_train]
    x_test: torch.Tensor    #: float32 [N_test, ...]
    y_test: torch.Tensor    #: int64 [N_test]
    num_classes: int

    def batches(self, batch_size: int, generator: torch.Generator):
        """Shuffled training batches (x [b, ...], y [b]) covering the train set once."""
        order = torch.randperm(len(self.y_train), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield self.x_train[idx], self.y_train[idx]


def digits(image: bool = False, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes), scaled to
    [0, 1] and standardised with the train split's statistics.

    x: float32 [N, 64], or [N, 1, 8, 8] with ``image=True``. The split is stratified and
    fixed by ``seed``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    i_train, i_test = train_test_split(range(len(y)), test_size=test_fraction, random_state=seed,
                                       stratify=y.numpy())
    x_train, x_test = x[i_train], x[i_test]
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    if image:
        x_train, x_test = x_train.view(-1, 1, 8, 8), x_test.view(-1, 1, 8, 8)
    return Split(x_train, y[i_train], x_test, y[i_test], 10)


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of correct argmax predictions of ``model(x)``."""
    correct = 0
    for start in range(0, len(y), batch_size):
        correct += int((model(x[start:start + batch_size]).argmax(1) == y[start:start + batch_size]).sum())
    return correct / len(y)


@functools.lru_cache(maxsize=4)  # generating takes seconds; the tensors are never written to
def mnist1d(num_samples: int = 5000, seed: int = 42, channels: bool = False) -> Split:
    """MNIST-1D (Greydanus 2020) generated offline by the ``mnist1d`` package's own
    generator (its default arguments: 40-step signals, 10 classes, 80/20 split); its
    download path is never used.

    x: float32 [N, 40], or [N, 1, 40] with ``channels=True`` for 1-D convolutions.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    d = make_dataset(args)
    x_train, x_test = (torch.tensor(d[k], dtype=torch.float32) for k in ("x", "x_test"))
    if channels:
        x_train, x_test = x_train.unsqueeze(1), x_test.unsqueeze(1)
    return Split(x_train, torch.tensor(d["y"], dtype=torch.int64), x_test,
                 torch.tensor(d["y_test"], dtype=torch.int64), 10)
