"""The ``localprop`` command. Each subcommand is a module of this package with
``register(subparsers)``, which adds its parser and sets ``func`` to its runner.

Errors end the command with one line on stderr and an exit code: 2 for a user error (the
library's validation errors, see :data:`USER_ERRORS`), 1 for an unexpected one, 130 for
Ctrl-C, 128 + the signal for a launcher of ranks stopped by a signal; ``localprop --debug
COMMAND`` lets the exception through with its traceback."""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

from localprop.distributed import DistributedError, Stopped
from localprop.ops import BackendUnavailable

SUBCOMMANDS = ("demo", "profile", "bench", "train", "info")
#: what the library raises for a bad input, with a message that says what to change
#: (ConfigError and NotDecoupled are ValueErrors)
USER_ERRORS = (ValueError, TypeError, FloatingPointError, FileNotFoundError, DistributedError,
               BackendUnavailable)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="localprop", description="Local learning for PyTorch.")
    p.add_argument("--debug", action="store_true", help="on an error, raise it with its traceback")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"localprop.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"localprop.cli.{name}":
                raise
            continue
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; its exit code (errors: see the module's docstring)."""
    args = parser().parse_args(argv)
    if args.debug:
        return _run(args)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return _fail(130, "interrupted")
    except Stopped as exc:  # the launcher of several ranks was told to stop: the shell's code for that signal
        return _fail(128 + exc.signum, str(exc))
    except USER_ERRORS as exc:
        return _fail(2, f"error: {_one_line(exc)}")
    except Exception as exc:
        return _fail(1, f"unexpected error: {type(exc).__name__}: {_one_line(exc)} "
                        "(run with --debug for the traceback)")


def _run(args) -> int:
    check_device(getattr(args, "device", None))  # every command's --device flag, in one place
    return args.func(args) or 0


def _fail(code: int, message: str) -> int:
    print(f"localprop: {message}", file=sys.stderr)
    return code


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines()) or type(exc).__name__


def check_device(name: str | None) -> None:
    """Refuse a --device that this torch cannot run on, before the command does any work:
    unchecked, a CPU build fails inside the first CUDA call with an AssertionError that
    does not say what to install. None: the command picks its default."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:  # not a device string at all
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected cpu, cuda or cuda:<index>")
    if device.type == "cpu":
        return
    if torch.version.cuda is None and torch.version.hip is None:
        raise ValueError(f"--device {name}: this torch ({torch.__version__}) is a CPU build; "
                         "install a CUDA build of torch to use the GPU")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch ({torch.__version__}, CUDA {torch.version.cuda}) sees no "
                         "GPU: check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        visible = "1 GPU is visible (cuda:0)" if count == 1 else \
            f"{count} GPUs are visible (cuda:0 to cuda:{count - 1})"
        raise ValueError(f"--device {name}: only {visible}")


if __name__ == "__main__":
    sys.exit(main())
