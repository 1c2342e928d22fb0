"""`lmforge run`: load a model, show how it reads a prompt and continue it greedily.

This is the smallest end-to-end tour of the flow: text → chat template → token
ids → forward pass → logits → most likely next tokens → text.
"""

from __future__ import annotations

import argparse
import time

import torch

from lmforge.sources import DEFAULT_MODEL


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("run", help="run a prompt through a model and print its greedy continuation",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help="the user message (wrapped in the model's chat template when it has one)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"embedded name, HF folder or .gguf file (default: {DEFAULT_MODEL})")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate (default: 24)")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from lmforge import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    print(f"loaded {args.model}: {type(model).__name__}, {model.num_parameters() / 1e6:.1f}M parameters "
          f"in {time.perf_counter() - start:.1f}s")
    if args.raw or not tokenizer.chat_template:
        ids = tokenizer.encode(args.prompt)
    else:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True)
    print(f"prompt: {len(ids)} tokens")

    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        probabilities = model(input_ids).logits[0, -1].softmax(-1)
        top = probabilities.topk(5)
        print("next-token candidates: " + ", ".join(
            f"{tokenizer.decode([i])!r} {p:.2f}" for p, i in zip(top.values.tolist(), top.indices.tolist())))
        start, generated = time.perf_counter(), []
        for _ in range(args.max_new_tokens):
            next_id = int(model(input_ids).logits[0, -1].argmax())
            if next_id == tokenizer.eos_token_id:
                break
            generated.append(next_id)
            input_ids = torch.cat([input_ids, torch.tensor([[next_id]])], dim=1)
    elapsed = time.perf_counter() - start
    print(f"greedy continuation ({len(generated)} tokens, {len(generated) / max(elapsed, 1e-9):.1f} tokens/s, "
          "full recompute per token):")
    print(tokenizer.decode(generated, skip_special_tokens=True))
    return 0
