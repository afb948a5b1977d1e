"""Training configuration of ``localprop train``: read from a JSON or TOML file and/or
flags, validated key by key, and turned into a dataset, a network and its optimizer.

Keys (all optional; defaults in :data:`DEFAULTS`):

    dataset      "digits" | "mnist1d" | "path/to/file.npz" (arrays x_train, y_train, x_test,
                 y_test) | "module:function" (returns a localprop.data.Split or a torch
                 Dataset of (x, y) pairs, split by ``test_fraction``); or a table
                 {name = ..., <keyword arguments of the function>}
    model        {mlp = [in, h1, ..., classes]} (localprop.mlp: LocalLinear nodes, ReLU but the last) |
                 {module = "module:function", nodes = K, kwargs = {...}, hooks = false} (any
                 nn.Module, made local with localize(..., nodes=K, hooks=...))
    rule         "greedy" | {name = "sgr", lam = 0.1, ...} (a name of localprop.rules.REGISTRY, or
                 "module:Class" of a Rule of one's own, and the rule's keyword arguments)
    optimizer    {name = "sgd" | "adam" | "adamw", <torch.optim keyword arguments>}
    epochs, batch_size, seed, backend, test_fraction
    distributed  {mode = "sync" | "async", staleness = 1, partition = "cost" | [nodes per rank],
                  timeout = seconds}

Every error is a :class:`ConfigError` naming the key, what was expected and what was received.
"""
from __future__ import annotations

import copy
import functools
import importlib
import json
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import data, rules

DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "model": {"mlp": [64, 256, 256, 10]},
    "rule": "greedy",
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "epochs": 5,
    "batch_size": 64,
    "seed": 0,
    "backend": None,
    "test_fraction": 0.2,
    "distributed": {"mode": "sync", "staleness": 1, "partition": "cost", "timeout": 60.0},
}
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
DIST_MODES = ("sync", "async")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names key, expected and received."""

    def __init__(self, key: str, expected: str, received: Any) -> None:
        super().__init__(f"config key {key!r}: expected {expected}, received {_received(received)}")
        self.key = key


#: characters of a received value's repr kept in a ConfigError (one line of a terminal)
REPR_CHARS = 80


def _received(value: Any) -> str:
    """``value`` for a one-line message, with its type: a module by its type alone (its
    repr is the whole model); a string or path in full (what was typed, and a path's end
    matters); any other value by its repr on one line, cut to REPR_CHARS."""
    if isinstance(value, nn.Module):
        return f"an nn.Module of type {type(value).__name__}"
    text = " ".join(line.strip() for line in repr(value).splitlines())
    if len(text) > REPR_CHARS and not isinstance(value, (str, Path)):
        text = text[:REPR_CHARS - 3] + "..."
    return f"{text} ({type(value).__name__})"


def read(path: str | Path) -> dict[str, Any]:
    """The table in a .json or .toml file (other suffixes: an error naming them)."""
    path = Path(path)
    if path.suffix not in (".json", ".toml"):
        raise ConfigError("config", "a .json or .toml file", str(path))
    text = path.read_text()
    try:
        table = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("config", f"valid {path.suffix[1:].upper()} ({exc})", str(path)) from None
    if not isinstance(table, dict):
        raise ConfigError("config", "a table of keys at the top level", table)
    return table


def resolve(table: dict[str, Any]) -> dict[str, Any]:
    """DEFAULTS overridden by ``table`` (the distributed table merged key by key), validated."""
    unknown = sorted(set(table) - set(DEFAULTS))
    if unknown:
        raise ConfigError(unknown[0], f"one of {', '.join(DEFAULTS)}", table[unknown[0]])
    cfg = copy.deepcopy(DEFAULTS)
    for key, value in table.items():
        if key == "distributed" and isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    validate(cfg)
    return cfg


def _positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(key, "an integer >= 1", value)


def validate(cfg: dict[str, Any]) -> None:
    """Check the types and ranges of every key that needs no import to check."""
    for key in ("epochs", "batch_size"):
        _positive_int(key, cfg[key])
    if not isinstance(cfg["seed"], int) or isinstance(cfg["seed"], bool):
        raise ConfigError("seed", "an integer", cfg["seed"])
    if cfg["backend"] is not None and not isinstance(cfg["backend"], str):
        raise ConfigError("backend", 'a backend name ("reference", "cpp", "triton", "cuda", "auto")', cfg["backend"])
    if not isinstance(cfg["test_fraction"], (int, float)) or not 0 < cfg["test_fraction"] < 1:
        raise ConfigError("test_fraction", "a number in (0, 1)", cfg["test_fraction"])
    _name_and_kwargs("dataset", cfg["dataset"])
    _name_and_kwargs("rule", cfg["rule"])
    name, kwargs = _name_and_kwargs("optimizer", cfg["optimizer"])
    if name not in OPTIMIZERS:
        raise ConfigError("optimizer.name", f"one of {', '.join(OPTIMIZERS)}", name)
    _validate_optimizer_numbers(kwargs)
    _validate_model(cfg["model"])
    _validate_distributed(cfg["distributed"])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    """A number that is finite as a float: false for inf, NaN and an int beyond float's
    range (the comparison is exact, so such an int does not overflow here)."""
    return _is_number(value) and abs(value) <= sys.float_info.max


def _validate_optimizer_numbers(kwargs: dict[str, Any]) -> None:
    """lr a finite number > 0, every other number (alone or in a list, as betas) finite:
    torch.optim refuses only negative values, so an inf or NaN (JSON's 1e400 or NaN, the
    flag --lr inf) would be taken and turn every weight non-finite at the first step."""
    if "lr" in kwargs and not (_finite(kwargs["lr"]) and kwargs["lr"] > 0):
        raise ConfigError("optimizer.lr", "a finite number > 0", kwargs["lr"])
    for key, value in kwargs.items():
        many = isinstance(value, (list, tuple))
        if any(_is_number(v) and not _finite(v) for v in (value if many else [value])):
            raise ConfigError(f"optimizer.{key}", "finite numbers" if many else "a finite number", value)


def _name_and_kwargs(key: str, value: Any) -> tuple[str, dict[str, Any]]:
    """"name" or {name = "...", **kwargs} -> (name, kwargs)."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return value["name"], {k: v for k, v in value.items() if k != "name"}
    raise ConfigError(key, 'a name or a table {name = "...", <keyword arguments>}', value)


def _validate_model(model: Any) -> None:
    if isinstance(model, dict) and "mlp" in model:
        sizes = model["mlp"]
        if (set(model) != {"mlp"} or not isinstance(sizes, list) or len(sizes) < 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)):
            raise ConfigError("model.mlp", "a list of >= 2 positive layer widths [in, ..., classes]", sizes)
        return
    if isinstance(model, dict) and isinstance(model.get("module"), str):
        extra = sorted(set(model) - {"module", "nodes", "kwargs", "hooks"})
        if extra:
            raise ConfigError(f"model.{extra[0]}", "only the keys module, nodes, kwargs, hooks", model[extra[0]])
        if not isinstance(model.get("hooks", False), bool):
            raise ConfigError("model.hooks", "true or false", model["hooks"])
        if "nodes" in model:
            _positive_int("model.nodes", model["nodes"])
        if not isinstance(model.get("kwargs", {}), dict):
            raise ConfigError("model.kwargs", "a table of keyword arguments", model["kwargs"])
        return
    raise ConfigError("model", '{mlp = [in, ..., classes]} or {module = "module:function", nodes = K}', model)


def _validate_distributed(dist: Any) -> None:
    if not isinstance(dist, dict):
        raise ConfigError("distributed", "a table {mode, staleness, partition, timeout}", dist)
    extra = sorted(set(dist) - set(DEFAULTS["distributed"]))
    if extra:
        raise ConfigError(f"distributed.{extra[0]}", f"one of {', '.join(DEFAULTS['distributed'])}",
                          dist[extra[0]])
    if dist["mode"] not in DIST_MODES:
        raise ConfigError("distributed.mode", f"one of {', '.join(DIST_MODES)}", dist["mode"])
    s = dist["staleness"]
    if not isinstance(s, int) or isinstance(s, bool) or s < 0:
        raise ConfigError("distributed.staleness", "an integer >= 0 (steps)", s)
    p = dist["partition"]
    if p != "cost" and not (isinstance(p, list) and p and all(isinstance(n, int) and n >= 1 for n in p)):
        raise ConfigError("distributed.partition", '"cost" or a list of node counts per rank, each >= 1', p)
    if not isinstance(dist["timeout"], (int, float)) or not dist["timeout"] > 0:
        raise ConfigError("distributed.timeout", "a number of seconds > 0", dist["timeout"])


# ---- building ------------------------------------------------------------------------
def import_target(key: str, spec: str) -> Callable:
    """The callable named by "module:function" (a clear error if it cannot be imported)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(key, '"module:function"', spec)
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(key, f'an importable "module:function" ({exc})', spec) from None
    if not callable(target):
        raise ConfigError(key, "a callable", spec)
    return target


def dataset(cfg: dict[str, Any]) -> data.Split:
    """The dataset the config names, as a Split."""
    name, kwargs = _name_and_kwargs("dataset", cfg["dataset"])
    if name == "digits":
        return data.digits(**kwargs)
    if name == "mnist1d":
        return data.mnist1d(**kwargs)
    if name.endswith(".npz"):
        return _npz(name)
    if ":" in name:
        made = import_target("dataset", name)(**kwargs)
        if isinstance(made, data.Split):
            return made
        if isinstance(made, torch.utils.data.Dataset):
            return _split_dataset(made, cfg["test_fraction"], cfg["seed"])
        raise ConfigError("dataset", "a function returning a localprop.data.Split or a torch Dataset", made)
    raise ConfigError("dataset", '"digits", "mnist1d", a .npz file or "module:function"', name)


def _npz(path: str) -> data.Split:
    if not Path(path).is_file():
        raise ConfigError("dataset", "an existing .npz file", path)
    import numpy as np

    with np.load(path) as arrays:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
        if missing:
            raise ConfigError("dataset", "a .npz with arrays x_train, y_train, x_test, y_test",
                              f"{path} without {', '.join(missing)}")
        x_train, x_test = (torch.as_tensor(arrays[k], dtype=torch.float32) for k in ("x_train", "x_test"))
        y_train, y_test = (torch.as_tensor(arrays[k]).long() for k in ("y_train", "y_test"))
    return data.Split(x_train, y_train, x_test, y_test, int(max(y_train.max(), y_test.max())) + 1)


def _split_dataset(ds, test_fraction: float, seed: int) -> data.Split:
    """A Dataset of (x, y) pairs stacked and split at random (fixed by ``seed``)."""
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    x = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in xs])
    y = torch.as_tensor([int(v) for v in ys], dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(test_fraction * len(y))))
    test, train = order[:n_test], order[n_test:]
    return data.Split(x[train], y[train], x[test], y[test], int(y.max()) + 1)


def rule(cfg: dict[str, Any]) -> rules.Rule:
    """The rule object the config names, built by localprop.rules.REGISTRY with its
    keyword arguments."""
    name, kwargs = _name_and_kwargs("rule", cfg["rule"])
    if ":" in name:  # a rule of the user's own, "module:Class"
        make = import_target("rule", name)
    elif name in rules.REGISTRY:
        make = rules.REGISTRY[name]
    else:
        raise ConfigError("rule", f'one of {", ".join(rules.REGISTRY)}, or "module:Class" of a Rule', name)
    try:
        made = make(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError("rule", f"keyword arguments of rule {name!r} ({exc})", kwargs) from None
    if not isinstance(made, rules.Rule):
        raise ConfigError("rule", "a localprop.rules.Rule", made)
    return made


def optimizer(cfg: dict[str, Any]) -> Callable:
    """A per-node optimizer factory ``params -> torch.optim.Optimizer``."""
    name, kwargs = _name_and_kwargs("optimizer", cfg["optimizer"])
    factory = functools.partial(OPTIMIZERS[name], **kwargs)
    try:
        factory([nn.Parameter(torch.zeros(1))])  # bad keyword arguments fail here, not mid-build
    except (TypeError, ValueError) as exc:
        raise ConfigError("optimizer", f"keyword arguments of torch.optim.{OPTIMIZERS[name].__name__} ({exc})",
                          kwargs) from None
    return factory


def network(cfg: dict[str, Any], split: data.Split):
    """The LocalSequential the config describes, built for ``split``'s inputs, with
    parameters drawn from the global RNG seeded by ``cfg["seed"]``."""
    from .localize import localize
    from .models import mlp

    torch.manual_seed(cfg["seed"])
    common = {"rule": rule(cfg), "num_classes": split.num_classes, "optimizer": optimizer(cfg),
              "backend": cfg["backend"]}
    model = cfg["model"]
    if "mlp" in model:
        sizes = model["mlp"]
        if (sizes[0],) != tuple(split.x_train.shape[1:]) or sizes[-1] != split.num_classes:
            raise ConfigError("model.mlp", f"widths from {list(split.x_train.shape[1:])} inputs to "
                              f"{split.num_classes} classes for this dataset", sizes)
        return mlp(sizes, **common)
    made = import_target("model.module", model["module"])(**model.get("kwargs", {}))
    if not isinstance(made, nn.Module):
        raise ConfigError("model.module", "a function returning an nn.Module", made)
    try:
        return localize(made, nodes=model.get("nodes"), example_input=split.x_train[:2],
                        hooks=model.get("hooks", False), **common)
    except (TypeError, ValueError) as exc:
        raise ConfigError("model", f"a model that localize() accepts ({exc})", model) from None
