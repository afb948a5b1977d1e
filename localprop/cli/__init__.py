"""The ``localprop`` command. Each subcommand is a module of this package with
``register(subparsers)``, which adds its parser and sets ``func`` to its runner."""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("demo", "profile", "bench", "train", "info")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="localprop", description="Local learning for PyTorch.")
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
    args = parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
