"""`lmforge generate`: complete one prompt and stream the answer to stdout.

The flow end to end: text → chat template (for chat models) → token ids → prefill and
one decoding step per token (logits → processors → sampler) → detokenized text.
Only the generated text is written to stdout; load time, token counts, speed and the
finish reason go to stderr.
"""

from __future__ import annotations

import argparse
import sys

from lmforge.cli.common import (
    add_model_argument,
    add_quantization_argument,
    add_sampling_arguments,
    load_generator,
    note,
    report,
    sampling_params,
    write_answer,
)
from lmforge.errors import InputError
from lmforge.generation.chat import ChatHistory

EXAMPLES = """examples:
  lmforge generate "Why is the sky blue?"
  lmforge generate "The capital of France is" --raw --temperature 0 --max-tokens 8
  echo "Write a haiku about the sea." | lmforge generate - --system "You are a poet." --top-p 0.9 --seed 1
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="complete a prompt, streaming the answer to stdout",
                                   description=__doc__, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    add_model_argument(parser)
    add_quantization_argument(parser)
    parser.add_argument("--raw", action="store_true",
                        help="send the text as is instead of wrapping it in the model's chat template")
    parser.add_argument("--system", metavar="TEXT", help="system prompt for the chat template")
    add_sampling_arguments(parser)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # bad values fail before the model loads
    if args.raw and args.system is not None:
        raise InputError("--system needs the chat template, which --raw turns off; drop one of them.")
    text = sys.stdin.read().rstrip("\r\n") if args.prompt == "-" else args.prompt
    model, tokenizer = load_generator(args.model, args.quantization, args.adapter)
    templated = not args.raw and bool(tokenizer.chat_template)
    if templated:
        history = ChatHistory(system=args.system)
        history.add_user(text)
        # The template writes any special tokens itself (BOS included), so none are added here.
        prompt_ids = tokenizer.encode(history.to_prompt(tokenizer), add_special_tokens=False)
    else:
        if not args.raw:
            if args.system is not None:
                raise InputError(f"{args.model} has no chat template, so --system cannot be applied; drop --system.")
            note(f"{args.model} has no chat template: the prompt is sent as is")
        prompt_ids = tokenizer.encode(text)
    note(f"prompt: {len(prompt_ids)} tokens{' (chat template)' if templated else ''}")
    answer = write_answer(model, tokenizer, prompt_ids, params)
    if sys.stdout.isatty():
        print()  # end the line for the shell prompt; a pipe or file gets the exact text
    report(answer, tokenizer)
    return 0
