"""Checkpoints that survive a crash: written to a temporary file beside the target,
synced, then renamed over it, so a crash mid-write leaves the previous checkpoint intact.

All or nothing both ways: :func:`save` refuses, before writing anything, a payload that
``torch.load(..., weights_only=True)`` could not read back or a network holding a NaN or
inf; :func:`load` changes nothing of the network when it raises (see
:meth:`Network.load_state_dict <localprop.network.Network.load_state_dict>`)."""
from __future__ import annotations

import cmath
import collections
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

FORMAT = 1

#: what the weights_only unpickler reads back, as exact types: a subclass (an IntEnum, a
#: namedtuple) is pickled by its class, which it refuses
SCALARS = (bool, int, float, complex, str, type(None))
TENSORS = (torch.Tensor, torch.nn.Parameter)
SEQUENCES = (list, tuple)
DICTS = (dict, collections.OrderedDict)  # module state_dicts are OrderedDicts


def save(path: str | os.PathLike, net: torch.nn.Module, **extra: Any) -> Path:
    """Write ``{"format", "net": net.state_dict(), "extra": extra}`` to ``path`` atomically
    and return the path. ``net.state_dict()`` holds parameters and buffers (the rule's
    included) and, as its extra state, the step count, every optimizer's state, the rule's
    identity and the optimizers' classes. ``extra``: tensors, numbers, strings, bools, None
    and lists, tuples and dicts of them (e.g. RNG states as tensors, the epoch).

    Raises before writing, leaving an existing checkpoint as it was: TypeError naming the
    key of a value weights_only loading would refuse; FloatingPointError naming the
    tensor of the network that holds a NaN or inf. Removes the temporary files of writers
    of this target that were killed mid-save."""
    path = Path(path)
    state = net.state_dict()
    for where, value in _values(state, "net"):
        _check_loadable(where, value)
        if isinstance(value, torch.Tensor):
            _check_finite(where, value)
    for where, value in _values(extra, "extra"):
        _check_loadable(where, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    _write({"format": FORMAT, "net": state, "extra": extra}, path)
    return path


def load(path: str | os.PathLike, net: torch.nn.Module, map_location=None) -> dict[str, Any]:
    """Restore ``net`` (built, of the same nodes, rule and optimizer classes) from ``path``;
    returns the ``extra`` values given to :func:`save`. Only tensors and plain data are
    unpickled. A localprop network is left unchanged when this raises."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or \
            not isinstance(payload.get("net"), dict) or not isinstance(payload.get("extra"), dict):
        raise ValueError(f"{path} is not a localprop checkpoint (format {FORMAT})")
    net.load_state_dict(payload["net"])
    return payload["extra"]


# ---- what may be saved ----------------------------------------------------------------
def _values(top: dict, name: str) -> Iterator[tuple[str, Any]]:
    """(key path, value) of every value inside ``top``'s containers, dict keys included,
    e.g. ("extra 'cfg'['lr']", 0.1); containers are walked, not yielded."""
    for key, value in top.items():
        yield from _walk(value, f"{name} {key!r}")


def _walk(value: Any, where: str) -> Iterator[tuple[str, Any]]:
    if type(value) in DICTS:
        for key, item in value.items():
            yield from _walk(key, f"{where}, key {key!r}")
            yield from _walk(item, f"{where}[{key!r}]")
    elif type(value) in SEQUENCES:
        for k, item in enumerate(value):
            yield from _walk(item, f"{where}[{k}]")
    else:
        yield where, value


def _check_loadable(where: str, value: Any) -> None:
    if type(value) not in SCALARS and type(value) not in TENSORS:
        kind = type(value).__qualname__ if type(value).__module__ == "builtins" else \
            f"{type(value).__module__}.{type(value).__qualname__}"
        raise TypeError(f"{where}: {kind} is not a tensor, number, string, bool, None, or list/tuple/dict of them "
                        f"(torch.load(..., weights_only=True) could not read it back); nothing was written")


def _check_finite(where: str, t: torch.Tensor) -> None:
    """Raise FloatingPointError if ``t`` holds a NaN or inf. As in
    :func:`localprop.errors.check_finite`, the sum is tested first (a finite sum proves
    every element finite, and costs far less than isfinite's bool tensor); only a
    non-finite sum, which finite elements can also give by overflowing, has the elements
    tested one by one."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return
    total = t if t.numel() == 1 else t.sum()
    if not cmath.isfinite(total.item()) and not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"{where}: non-finite values ({t.detach().flatten()[:4].tolist()}...); a checkpoint "
                                 f"holds finite values only, nothing was written")


# ---- writing --------------------------------------------------------------------------
def _write(payload: dict, path: Path) -> None:
    """``payload`` to a temporary file named after its writer, synced, renamed over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
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


def _temporary_prefix(path: Path) -> str:
    """``.<target>.<host>.<pid>.``: a process killed mid-save (kill -9 runs no cleanup)
    leaves its temporary file, and the pid tells a later save whether its writer is gone.
    The host, because a pid means nothing on another machine sharing the folder."""
    return f".{path.name}.{socket.gethostname()}.{os.getpid()}."


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of ``path`` whose writer, a process of this host, no
    longer exists; never one of a live process (which may be writing it now)."""
    # mkstemp's random part: letters, digits and "_", no dots
    written_by = re.compile(re.escape(f".{path.name}.{socket.gethostname()}.") + r"([0-9]+)\.[a-z0-9_]+\.tmp")
    for entry in os.scandir(path.parent):
        match = written_by.fullmatch(entry.name)
        if match and not _alive(int(match[1])):
            Path(entry.path).unlink(missing_ok=True)  # another save may have removed it first


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, another user's
        return True
    return True


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
