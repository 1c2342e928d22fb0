"""`lmforge tokens`: what text costs in tokens, and how to send less of it.

`count`: how many tokens a text, a file or a chat costs with a model's tokenizer.

A chat (a .json chat history: lmforge's, from `lmforge chat` /save, or an OpenAI-style list of
messages) is rendered with the model's chat template, as the model receives it, and counted per
message: the message's own text, and what its whole turn adds (role markers, separators, a default
system prompt the template inserts). The assistant's cue closes the prompt. Any other file, text
given on the command line, or - (standard input) is counted as a raw prompt. --price-in and
--price-out (per million tokens, as providers quote them) add a cost estimate; --output-tokens is
the answer length the estimate assumes.

`compact`: a .txt, .md, .json, .csv or .html file as compact text for a prompt (whitespace runs,
markup, link targets, JSON indentation, CSV quoting dropped), on stdout or into --out, with the
tokens before and after on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.cli.common import add_model_argument
from lmforge.errors import InputError

EXAMPLES = """examples:
  lmforge tokens count "How many tokens is this sentence?"
  lmforge tokens count README.md
  lmforge tokens count chat.json                     # per message, template overhead included
  lmforge tokens count chat.json --price-in 0.15 --price-out 0.60 --output-tokens 200
  cat notes.txt | lmforge tokens count - --json
  lmforge tokens compact page.html --out page.txt     # the visible text only
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("tokens", help="count the tokens of a text, file or chat (and their cost)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="tokens_command", required=True, metavar="COMMAND")
    count = commands.add_parser("count", help="count tokens, per message for a chat", description=__doc__,
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    count.add_argument("source", metavar="TEXT|FILE|-", help="text, a file (.json: a chat history), or - for stdin")
    add_model_argument(count)
    count.add_argument("--price-in", type=float, metavar="X", help="price per million input tokens")
    count.add_argument("--price-out", type=float, default=0.0, metavar="X",
                       help="price per million output tokens (default: 0)")
    count.add_argument("--output-tokens", type=int, default=0, metavar="N",
                       help="answer length assumed by the cost estimate (default: 0)")
    count.add_argument("--json", action="store_true", help="print the counts as JSON")
    count.set_defaults(handler=run_count)
    compact = commands.add_parser("compact", help="a file as compact text for a prompt, tokens before and after",
                                  description=__doc__, epilog=EXAMPLES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    compact.add_argument("file", help="a .txt, .md, .json, .csv or .html file")
    add_model_argument(compact)
    compact.add_argument("--out", metavar="FILE", help="write the compact text here instead of stdout")
    compact.set_defaults(handler=run_compact)


def _read_source(source: str):
    """(text, None) for a raw prompt, or (None, ChatHistory) for a .json chat file."""
    from lmforge.generation.chat import ChatHistory

    if source == "-":
        return sys.stdin.read(), None
    path = Path(source)
    if path.suffix.lower() == ".json":
        return None, ChatHistory.load(path)  # says which file is missing or malformed
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read it as UTF-8 text ({exc}); give a text file.") from exc
    return source, None


def run_count(args: argparse.Namespace) -> int:
    from lmforge import AutoTokenizer
    from lmforge.context.accounting import Prices, count_chat, count_text

    if args.output_tokens < 0:
        raise InputError(f"--output-tokens must be >= 0, got {args.output_tokens}.")
    prices = None if args.price_in is None else Prices(args.price_in, args.price_out)
    text, history = _read_source(args.source)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    report: dict = {"model": str(args.model)}
    if history is None:
        report["total"] = count_text(tokenizer, text)
    else:
        counted = count_chat(tokenizer, history)
        report.update(messages=[{"role": m.role, "content_tokens": m.content_tokens, "turn_tokens": m.turn_tokens}
                                for m in counted.messages],
                      generation_prompt_tokens=counted.generation_prompt_tokens, total=counted.total,
                      content_tokens=counted.content_tokens, template_tokens=counted.template_tokens)
    if prices is not None:
        report.update(output_tokens=args.output_tokens, cost=prices.cost(report["total"], args.output_tokens))
    if args.json:
        print(json.dumps(report))
    elif history is None:
        print(report["total"])
    else:
        _print_chat(report)
    if prices is not None and not args.json:
        print(f"cost: {report['cost']:.6f} for {report['total']} input + {args.output_tokens} output tokens "
              f"at {prices.input_per_million:g} / {prices.output_per_million:g} per million")
    return 0


def _print_chat(report: dict) -> None:
    print(f"{'#':>3}  {'role':<10} {'text':>6} {'turn':>6} {'template':>9}")
    for index, message in enumerate(report["messages"]):
        print(f"{index:>3}  {message['role']:<10} {message['content_tokens']:>6} {message['turn_tokens']:>6} "
              f"{message['turn_tokens'] - message['content_tokens']:>9}")
    print(f"{'':>3}  {'(cue)':<10} {'':>6} {report['generation_prompt_tokens']:>6} "
          f"{report['generation_prompt_tokens']:>9}")
    print(f"total: {report['total']} tokens ({report['content_tokens']} text, {report['template_tokens']} template)")


def run_compact(args: argparse.Namespace) -> int:
    from lmforge import AutoTokenizer
    from lmforge.cli.common import note
    from lmforge.context.converters import compact_file

    result = compact_file(args.file, AutoTokenizer.from_pretrained(args.model))
    if args.out:
        try:
            Path(args.out).write_text(result.text, encoding="utf-8")
        except OSError as exc:
            raise InputError(f"{args.out}: cannot write the compact text ({exc.strerror}); choose a writable "
                             "path.") from exc
    else:
        sys.stdout.write(result.text)
    note(f"{args.file}: {result.tokens_before} -> {result.tokens_after} tokens ({result.saved:.0%} fewer)")
    return 0
