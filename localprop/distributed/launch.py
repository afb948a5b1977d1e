"""Process groups and the local launcher: joining a group within a bounded time, the
ranks' agreement on what they were started with, and N local ranks that never outlive
the launcher."""
from __future__ import annotations

import datetime
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import torch.distributed as dist

from .errors import DistributedError


def init_from_env(timeout: float, device_type: str = "cpu") -> tuple[int, int]:
    """Join the process group that RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT describe
    (as torchrun sets them): gloo on CPU, NCCL on CUDA. Returns (rank, world size).

    Joining is bounded by ``timeout`` seconds whatever the peer does: a store client that
    reaches a port held by another program (not a rendezvous store) waits for its handshake
    forever, whatever timeout torch is given (seen: over 120 s). So a watchdog ends this
    process with a clear message if the group is not joined in time."""
    backend, rank = ("nccl" if device_type == "cuda" else "gloo"), os.environ.get("RANK", "?")
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    joined = threading.Event()

    def watchdog() -> None:
        if not joined.wait(timeout):
            print(f"rank {rank}: could not join the {backend} process group at {where} within {timeout:g} s "
                  f"(is the port taken by another program, or did rank 0 fail?)", file=sys.stderr, flush=True)
            os._exit(3)

    threading.Thread(target=watchdog, daemon=True, name="localprop-join-watchdog").start()
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError, dist.DistError) as exc:
        raise DistributedError(f"rank {rank}: could not join the {backend} process group at {where} within "
                               f"{timeout:g} s ({exc})") from exc
    finally:
        joined.set()
    return dist.get_rank(), dist.get_world_size()


def all_ranks(value: Any, what: str) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; every rank calls it. A peer that
    died or hung is a DistributedError naming ``what`` was being exchanged."""
    gathered: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(gathered, value)
    except (RuntimeError, dist.DistError) as exc:
        raise DistributedError(f"rank {dist.get_rank()}: exchanging {what} failed: a rank died or hung "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    return gathered


def agree(facts: dict[str, Any]) -> None:
    """Check that every rank was started with the same ``facts`` (JSON-like: the config,
    a digest of the data, the partition, ...); raise DistributedError naming the first
    key that differs, with rank 0's value and the other rank's. Every rank calls it."""
    gathered = all_ranks(facts, "the ranks' configurations")
    for r, theirs in enumerate(gathered):
        diff = _first_difference(gathered[0], theirs)
        if diff is not None:
            key, mine, other = diff
            raise DistributedError(f"ranks disagree on {key}: rank 0 has {mine!r}, rank {r} has {other!r}; every "
                                   f"rank must be started with the same configuration, data and command line")


def _first_difference(a: Any, b: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, a's value, b's value) of the first place where a and b differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            diff = _first_difference(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
            if diff is not None:
                return diff
        return None
    return None if a == b else (key or "the configuration", a, b)


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stopped(RuntimeError):
    """The launcher was told to stop (SIGTERM, SIGINT, SIGHUP) and stopped its ranks."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; every rank was stopped")
        self.signum = signum


def launch(argv: list[str], ranks: int, grace: float = 5.0) -> int:
    """Run ``python -m localprop <argv>`` as ``ranks`` local processes of one gloo group on
    localhost. When a rank exits with an error, the others are terminated (SIGTERM, then
    SIGKILL after ``grace`` seconds) and a DistributedError names the first rank that
    failed: ranks are watched in the order they exit, since a rank killed from outside takes
    its peers down with it within moments (gloo may abort them), and a poll of all exit codes
    could find the consequence first. Returns 0.

    No rank outlives the launcher: SIGTERM, SIGINT or SIGHUP to it stops every rank (then
    :class:`Stopped` is raised), and if it is killed outright (SIGKILL), the kernel sends
    each rank SIGTERM (Linux's parent-death signal)."""
    env = {**os.environ, "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    exits: queue.Queue[tuple[int, int]] = queue.Queue()
    previous = _raise_on_signals()
    procs: list[subprocess.Popen] = []
    try:
        for r in range(ranks):
            procs.append(subprocess.Popen([sys.executable, "-m", "localprop", *argv], preexec_fn=_die_with(os.getpid()),
                                          env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}))
            threading.Thread(target=lambda r=r, p=procs[-1]: exits.put((r, p.wait())), daemon=True).start()
        for _ in procs:
            r, code = exits.get()
            if code != 0:
                why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                raise DistributedError(f"rank {r} of {ranks} stopped with {why}; the other ranks were stopped")
        return 0
    finally:
        for s in previous:  # a second signal must not interrupt the stopping of the ranks
            signal.signal(s, signal.SIG_IGN)
        _stop(procs, grace)
        for s, handler in previous.items():
            signal.signal(s, handler)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _raise_on_signals() -> dict:
    """Make the stop signals raise :class:`Stopped` in the main thread (by default SIGTERM
    and SIGHUP end the process at once, without the ``finally`` that stops the ranks);
    returns the previous handlers. Outside the main thread signals cannot be handled, and
    nothing is changed."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        raise Stopped(signum)

    return {s: signal.signal(s, handler) for s in _STOP_SIGNALS}


def _die_with(parent: int):
    """A preexec_fn: the child gets SIGTERM when the launcher dies, however it dies
    (prctl PR_SET_PDEATHSIG, Linux), and exits at once if it died already. The libc
    handle is taken here, in the parent: a child forked from a threaded parent must not
    import or allocate before exec."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes
        prctl = ctypes.CDLL(None).prctl

    def arm() -> None:
        if prctl is not None:
            prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)
    return arm


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
        p.send_signal(signal.SIGCONT)  # a stopped (SIGSTOP) rank acts on SIGTERM only once continued
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
