"""`lmforge eval perplexity`: how well a model predicts a text file (lower is better).

Perplexity is exp(mean negative log-likelihood of each next token). Use it to compare a model
with itself after a change — quantization, fine-tuning — on the same text and settings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lmforge.cli.common import QUANTIZATION_CHOICES, add_model_argument
from lmforge.errors import InputError

EXAMPLES = """examples:
  lmforge eval perplexity --text /usr/share/common-licenses/GPL-3
  lmforge eval perplexity --text book.txt --context 1024 --stride 512 --quantization int8
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model (perplexity)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")
    ppl = commands.add_parser("perplexity", help="sliding-window perplexity of a text file", description=__doc__,
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(ppl)
    ppl.add_argument("--text", required=True, help="UTF-8 text file to score")
    ppl.add_argument("--context", type=int, default=512, help="tokens per window (default: 512)")
    ppl.add_argument("--stride", type=int, default=None,
                     help="tokens between window starts; smaller = more context per token, slower "
                          "(default: the context)")
    ppl.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default=None,
                     help="quantize the model's Linear layers first; gguf keeps a GGUF file's own Q8_0/Q4_1/Q4_0 "
                          "blocks (default: none)")
    ppl.add_argument("--group-size", type=int, default=32, help="int4 group size: 32, 64 or 128 (default: 32)")
    ppl.set_defaults(handler=run_perplexity)


def run_perplexity(args: argparse.Namespace) -> int:
    from lmforge import AutoModelForCausalLM, AutoTokenizer
    from lmforge.evaluation import perplexity
    from lmforge.quant import load_quantized, quantize_model

    path = Path(args.text)
    if not path.is_file():
        raise InputError(f"text file {str(path)!r} not found; pass an existing UTF-8 file with --text.")
    text = path.read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.quantization == "int4":
        model = AutoModelForCausalLM.from_pretrained(args.model)
        quantize_model(model, "int4", group_size=args.group_size)
    else:
        model = load_quantized(args.model, quantization=args.quantization)
    ids = tokenizer.encode(text)
    start = time.perf_counter()
    result = perplexity(model, ids, args.context, args.stride, progress=True)
    print(f"{result.perplexity:.4f}")
    print(f"{args.model} ({args.quantization or 'unquantized'}): {result.tokens} tokens scored, context "
          f"{args.context}, stride {args.stride or args.context}, mean NLL {result.nll / result.tokens:.4f} nats, "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0
