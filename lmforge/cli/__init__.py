"""The `lmforge` command. Each command lives in its own module and adds a subparser.

Errors a user can cause (a missing model, an invalid sampling value, a prompt longer than
the context window) are `LMForgeError`s: they end the command with one line on stderr and
exit status 2, like argparse's own usage errors, never with a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from lmforge.cli import (
    chat,
    dpo,
    evaluate,
    explain,
    export,
    finetune,
    generate,
    grpo,
    info,
    ppo,
    pretrain,
    quantize,
    rag,
    reward_model,
    serve,
    sft,
    sweep,
    tokens,
)
from lmforge.cli.option_files import apply_config_option
from lmforge.errors import LMForgeError

COMMANDS = (generate, chat, info, serve, evaluate, quantize, export, pretrain, sweep, finetune, sft, dpo,
            reward_model, grpo, ppo, tokens, rag, explain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge", description="A hackable transformer stack: generate text, chat, inspect and serve models.",
        epilog="Run `lmforge COMMAND --help` for a command's options and examples.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        apply_config_option(parser, argv)  # a command's --config file: its options become the defaults
        args = parser.parse_args(argv)
        return args.handler(args) or 0
    except LMForgeError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130  # the shell's convention for "ended by Ctrl-C"
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
