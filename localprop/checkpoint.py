"""Checkpoints that survive a crash: written to a temporary file beside the target,
synced, then renamed over it, so a crash mid-write leaves the previous checkpoint intact."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = 1


def save(path: str | os.PathLike, net: torch.nn.Module, **extra: Any) -> Path:
    """Write ``net.state_dict()`` (parameters, optimizer and rule state, step count) and
    ``extra`` (tensors, numbers, strings, lists and dicts of them: e.g. RNG states, the
    epoch) to ``path`` atomically. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "net": net.state_dict(), "extra": extra}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_dir(path.parent)
    return path


def load(path: str | os.PathLike, net: torch.nn.Module, map_location=None) -> dict[str, Any]:
    """Restore ``net`` (built, of the same nodes and rule) from ``path``; returns the
    ``extra`` values given to :func:`save`. Only tensors and plain data are unpickled."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a localprop checkpoint (format {FORMAT})")
    net.load_state_dict(payload["net"])
    return payload["extra"]


def _sync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX needs the folder synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
