"""`lmforge explain`: one prompt through the model, every stage shown — tokens, architecture, sampling decisions.

The prompt is wrapped in the chat template (unless --raw), tokenized, and answered exactly as
`lmforge generate` would answer it; at every step the report keeps the model's top candidates and
what each logits processor (penalties, temperature, top-k/top-p/min-p) did to them before the
token was chosen. The forward pass over prompt and answer shows each layer's hidden-state size and
what attention and the MLP add, attention maps of the chosen --layers and --heads, and which
earlier tokens each generated token read most. --out writes a self-contained HTML page (no scripts, nothing fetched); --json
prints the same data for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lmforge.cli.common import (
    add_model_argument,
    add_quantization_argument,
    add_sampling_arguments,
    load_generator,
    note,
    sampling_params,
)
from lmforge.errors import InputError

EXAMPLES = """examples:
  lmforge explain "Why is the sky blue?" --max-tokens 8 --out sky.html
  lmforge explain "The capital of France is" --raw --temperature 0.8 --top-k 20 --seed 1 --out paris.html
  lmforge explain "Hi" --max-tokens 4 --json | python -m json.tool
  lmforge explain "2 + 2 =" --raw --max-tokens 2 --layers 0,11,29 --heads 0,1 --out sums.html
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("explain", help="show tokens, architecture and every sampling decision "
                                                   "for one prompt (HTML or JSON report)",
                                   description=__doc__, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    add_model_argument(parser)
    add_quantization_argument(parser)
    parser.add_argument("--raw", action="store_true", help="explain the text as is, without the chat template")
    parser.add_argument("--top", type=int, default=10, metavar="N", help="candidates kept per step and stage "
                                                                          "(default: 10)")
    parser.add_argument("--layers", type=index_list, metavar="I,J", help="layers whose attention maps are shown "
                                                                           "(default: first, middle, last)")
    parser.add_argument("--heads", type=index_list, metavar="I,J", help="heads shown of those layers (default: all)")
    parser.add_argument("--out", metavar="FILE", help="write the HTML report here")
    parser.add_argument("--json", action="store_true", help="print the report's data as JSON on stdout")
    add_sampling_arguments(parser)
    parser.set_defaults(handler=handle)


def index_list(value: str) -> list[int]:
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected indices separated by commas, like 0,5,11; got {value!r}") from None


def _check_writable(path: str) -> Path:
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        reason = "is a folder" if out.is_dir() else "is in a folder that does not exist or is not writable"
        raise InputError(f"--out {path} {reason}; give a file path in a writable folder.")
    return out


def handle(args: argparse.Namespace) -> int:
    from lmforge.explain.html import render
    from lmforge.explain.report import explain

    params = sampling_params(args)  # bad values, and an unwritable report path, fail before the model loads
    if args.out is None and not args.json:
        raise InputError("say where the report goes: --out report.html, --json, or both.")
    out = _check_writable(args.out) if args.out else None
    text = sys.stdin.read().rstrip("\r\n") if args.prompt == "-" else args.prompt
    model, tokenizer = load_generator(args.model, args.quantization, args.adapter)
    report = explain(model, tokenizer, text, params, chat=not args.raw and bool(tokenizer.chat_template),
                     top=args.top, model_name=args.model, layers=args.layers, heads=args.heads)
    if out is not None:
        out.write_text(render(report), encoding="utf-8")
        note(f"report written to {out} ({len(report.sampling)} steps)")
    if args.json:
        print(json.dumps(report.to_json(), ensure_ascii=False))
    return 0
