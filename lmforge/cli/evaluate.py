"""`lmforge eval`: measure a model.

- `perplexity`: how well a model predicts a text file (lower is better). Perplexity is
  exp(mean negative log-likelihood of each next token). Use it to compare a model with itself
  after a change — quantization, fine-tuning — on the same text and settings.
- `exact-match`: how often a chat model's greedy answer to held-out questions is exactly right —
  zero-shot, few-shot (solved examples shown as earlier chat turns, no weight update), or with a
  fine-tuned adapter. Few-shot turns are a chat history: --save-history writes them as JSON that
  `lmforge chat` can /load, and --history reads one (for example saved from a chat with /save).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lmforge.cli.common import (
    QUANTIZATION_CHOICES,
    add_model_argument,
    add_quantization_argument,
    note,
)
from lmforge.errors import InputError

EXAMPLES = """examples:
  lmforge eval perplexity --text /usr/share/common-licenses/GPL-3
  lmforge eval perplexity --text book.txt --context 1024 --stride 512 --quantization int8
"""
EXACT_MATCH_EXAMPLES = """examples:
  lmforge eval exact-match                                  # the dates task, zero-shot
  lmforge eval exact-match --shots 3 --save-history shots.json
  lmforge eval exact-match --history shots.json            # the same 3 shots, read back
  lmforge eval exact-match --adapter dates-lora            # after `lmforge sft --out dates-lora`
  lmforge eval exact-match --data held.jsonl --shots-from train.jsonl --shots 5 --predictions out.jsonl

Rows are {"instruction", "response"} (optional "input") or {"messages": [...]}, one per line
(.jsonl) or a JSON array; the expected answer is the last assistant message. Without --data the
rows are the dates task's held-out split (dates in words -> ISO 8601), the shots its training split.
"""
DATES_HELD_OUT = 100


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model (perplexity, task exact match)", description=__doc__,
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

    exact = commands.add_parser("exact-match", help="held-out exact-match accuracy, zero-shot, few-shot or with an "
                                "adapter", description=__doc__, epilog=EXACT_MATCH_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(exact)
    add_quantization_argument(exact)
    exact.add_argument("--data", metavar="FILE", help="held-out rows (.json/.jsonl; default: the dates task)")
    exact.add_argument("--limit", type=int, metavar="N", help="evaluate the first N rows only")
    shots = exact.add_mutually_exclusive_group()
    shots.add_argument("--shots", type=int, default=0, metavar="K",
                       help="show K solved examples (from --shots-from) before each question (default: 0)")
    shots.add_argument("--history", metavar="FILE",
                       help="a chat history JSON (lmforge's, or an OpenAI-style list of messages) to ask after")
    exact.add_argument("--shots-from", metavar="FILE",
                       help="rows the --shots come from, the first K (default: the dates task's training rows)")
    exact.add_argument("--system", help="a system prompt for the few-shot history")
    exact.add_argument("--save-history", metavar="FILE", help="write the few-shot turns as a chat history JSON")
    exact.add_argument("--max-tokens", type=int, default=32, metavar="N", help="longest answer (default: 32)")
    exact.add_argument("--predictions", metavar="FILE",
                       help="write each question's answer, expected answer and verdict as JSONL")
    exact.set_defaults(handler=run_exact_match)


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
        quantize_model(model, "int4", tied_head=True, group_size=args.group_size)
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


def _exact_match_rows(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(held-out rows, rows the shots come from)."""
    from lmforge.align.sft import read_rows
    from lmforge.align.tasks import date_splits

    train, held_out = date_splits(held_out=DATES_HELD_OUT)
    rows = read_rows(args.data) if args.data else held_out
    shot_rows = read_rows(args.shots_from) if args.shots_from else train
    if args.limit is not None:
        if args.limit < 1:
            raise InputError(f"--limit must be at least 1, got {args.limit}.")
        rows = rows[:args.limit]
    if args.shots < 0 or args.shots > len(shot_rows):
        raise InputError(f"--shots {args.shots}: choose between 0 and the {len(shot_rows)} rows of "
                         f"{args.shots_from or 'the dates training split'}.")
    return rows, shot_rows


def run_exact_match(args: argparse.Namespace) -> int:
    from lmforge.cli.common import load_generator
    from lmforge.evaluation import evaluate_exact_match, few_shot_history
    from lmforge.evaluation.exact_match import question_and_answer
    from lmforge.generation.chat import ChatHistory

    if args.max_tokens < 1:
        raise InputError(f"--max-tokens must be at least 1, got {args.max_tokens}.")
    rows, shot_rows = _exact_match_rows(args)
    for number, row in enumerate(rows, 1):  # a bad row fails before the model loads
        question_and_answer(row, number)
    if args.history:
        history = ChatHistory.load(args.history)
        if args.system:
            history.set_system(args.system)
    else:
        history = few_shot_history(shot_rows[:args.shots], system=args.system)
    if args.save_history:
        history.save(args.save_history)
        note(f"saved the {len(history.messages) // 2} few-shot turn(s) to {args.save_history}")
    model, tokenizer = load_generator(args.model, args.quantization, args.adapter)
    start = time.perf_counter()
    result = evaluate_exact_match(model, tokenizer, rows, history, max_new_tokens=args.max_tokens, progress=True)
    if args.predictions:
        _write_predictions(args.predictions, result)
    print(f"{result.exact_match:.4f}")
    shown = f"{args.history}" if args.history else f"{args.shots} shot(s)"
    right = sum(result.correct)
    print(f"{args.model}{' + ' + args.adapter if args.adapter else ''}: {right}/{len(rows)} exact "
          f"({result.exact_match:.1%}) after {shown}, {time.perf_counter() - start:.1f} s; first answer "
          f"{result.answers[0].strip()!r}, expected {result.expected[0]!r}", file=sys.stderr)
    return 0


def _write_predictions(path: str, result) -> None:
    lines = [json.dumps({"answer": answer, "expected": expected, "exact": correct}, ensure_ascii=False)
             for answer, expected, correct in zip(result.answers, result.expected, result.correct)]
    try:
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot write the predictions ({exc.strerror}); choose a writable path.") from exc
