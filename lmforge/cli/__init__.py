"""The `lmforge` command. Each command group lives in its own module and adds a subparser."""

from __future__ import annotations

import argparse
import sys

from lmforge.cli import info, run
from lmforge.errors import LMForgeError

COMMANDS = (run, info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="A hackable transformer stack.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except LMForgeError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return 2
