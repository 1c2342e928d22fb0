"""Structured output: validity and cost of constrained decoding, and the two grammar engines side by side.

1. Grammar engines (llguidance, which lmforge uses, and outlines-core) on SmolLM2's 49,152-token vocabulary:
   vocabulary setup, grammar compile time per schema, and the time to compute the next-token mask, following
   a valid answer of each schema token by token.
2. lmforge with SmolLM2-135M-Instruct: --per-schema sampled answers (temperature --temperature) for each of the
   5 schemas — the share that parses and validates (jsonschema) — and the per-token overhead of the grammar:
   each constrained generation is timed against an unconstrained one of the same prompt and the same number of
   tokens (ignore_eos), interleaved.
Writes the table to docs/benchmarks.md (section "structured").
Usage: python -m benchmarks.structured [--per-schema 20] [--temperature 0.7] [--max-tokens 120]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.report import machine_line, markdown_table, write_section

MODEL = "smollm2-135m-instruct"
SCHEMAS = {
    "person": ({"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                                 "age": {"type": "integer", "minimum": 0, "maximum": 130}},
                "required": ["name", "age"], "additionalProperties": False},
               "Describe a fictional person as JSON with their name and age.",
               {"name": "Ada Lovelace", "age": 36}),
    "product (enum, array)": ({"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 60}, "category": {"enum": ["book", "food", "tool", "toy"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "price": {"type": "number", "minimum": 0}},
        "required": ["title", "category", "tags", "price"], "additionalProperties": False},
        "Describe a product for an online shop as JSON: title, category, tags and price.",
        {"title": "A Hammer", "category": "tool", "tags": ["steel", "heavy"], "price": 12.5}),
    "address (nested)": ({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40},
        "address": {"type": "object", "properties": {"street": {"type": "string", "maxLength": 60},
                                                     "city": {"type": "string", "maxLength": 40},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
        "Give the postal address of a fictional person as JSON: name, and address with street, city and zip.",
        {"name": "Bob", "address": {"street": "1 Main Street", "city": "Springfield", "zip": "12345"}}),
    "event (pattern, boolean)": ({"type": "object", "properties": {
        "event": {"type": "string", "maxLength": 60},
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}, "public": {"type": "boolean"}},
        "required": ["event", "date", "public"], "additionalProperties": False},
        "Describe a historical event as JSON: event, date (YYYY-MM-DD) and whether it was public.",
        {"event": "Moon landing", "date": "1969-07-20", "public": True}),
    "shopping list (array of objects)": ({"type": "object", "properties": {"items": {
        "type": "array", "minItems": 1, "maxItems": 5, "items": {
            "type": "object", "properties": {"item": {"type": "string", "maxLength": 30},
                                             "quantity": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["item", "quantity"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False},
        "Write a shopping list for a picnic as JSON: a list of items with quantities.",
        {"items": [{"item": "bread", "quantity": 2}, {"item": "apples", "quantity": 6}]}),
}


def byte_level_vocabulary(tokenizer) -> dict[bytes, list[int]]:
    """Each token's bytes (GPT-2 byte-level BPE writes byte b as a printable stand-in character)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            stand_ins[chr(byte)] = byte
        else:
            stand_ins[chr(256 + extra)] = byte
            extra += 1
    vocabulary: dict[bytes, list[int]] = {}
    for token, token_id in tokenizer.backend.get_vocab().items():
        if token_id == tokenizer.eos_token_id:
            continue
        key = bytes(stand_ins[c] for c in token) if all(c in stand_ins for c in token) else token.encode()
        vocabulary.setdefault(key, []).append(token_id)
    return vocabulary


def compare_engines(tokenizer, repeats: int) -> list[list[str]]:
    """Per schema: compile time and mask time per token for llguidance and outlines-core."""
    import llguidance
    import llguidance.torch
    import outlines_core
    import torch
    from outlines_core.json_schema import build_regex_from_schema

    from lmforge.context.structured import JSON_STYLE, GrammarVocabulary

    started = time.perf_counter()
    llg_vocab = GrammarVocabulary(tokenizer, [tokenizer.eos_token_id]).tokenizer
    llg_setup = time.perf_counter() - started
    started = time.perf_counter()
    outlines_vocab = outlines_core.Vocabulary(tokenizer.eos_token_id, byte_level_vocabulary(tokenizer))
    outlines_setup = time.perf_counter() - started
    rows = [["vocabulary setup (once)", f"{llg_setup * 1e3:.0f} ms", f"{outlines_setup * 1e3:.0f} ms", "", ""]]
    for name, (schema, _, example) in SCHEMAS.items():
        target = tokenizer.encode(json.dumps(example), add_special_tokens=False) + [tokenizer.eos_token_id]

        def llguidance_run():
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
            compiled = time.perf_counter()
            matcher = llguidance.LLMatcher(llg_vocab, grammar, log_level=0)
            compiled = time.perf_counter() - compiled
            mask, masks = llguidance.torch.allocate_token_bitmask(1, tokenizer.vocab_size), []
            for token in target:
                start = time.perf_counter()
                llguidance.torch.fill_next_token_bitmask(matcher, mask)
                masks.append(time.perf_counter() - start)
                assert matcher.consume_token(token), (name, matcher.get_error())
            return compiled, masks

        def outlines_run():
            compiled = time.perf_counter()
            index = outlines_core.Index(build_regex_from_schema(json.dumps(schema), r"[ ]?"), outlines_vocab)
            guide = outlines_core.Guide(index)
            compiled = time.perf_counter() - compiled
            mask, masks = torch.zeros((tokenizer.vocab_size + 31) // 32, dtype=torch.int32), []
            for token in target[:-1]:
                start = time.perf_counter()
                guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
                masks.append(time.perf_counter() - start)
                guide.advance(token)
            assert guide.is_finished(), name
            return compiled, masks

        results = {}
        for engine, run in (("llguidance", llguidance_run), ("outlines-core", outlines_run)):
            runs = [run() for _ in range(repeats)]
            results[engine] = (statistics.median(c for c, _ in runs),
                               statistics.median(statistics.median(m) for _, m in runs),
                               statistics.median(max(m) for _, m in runs))
        (llg_compile, llg_mask, llg_worst), (out_compile, out_mask, out_worst) = results.values()
        rows.append([f"{name}: compile", f"{llg_compile * 1e3:.1f} ms", f"{out_compile * 1e3:.1f} ms", "", ""])
        rows.append([f"{name}: mask per token (median / worst)", f"{llg_mask * 1e6:.0f} / {llg_worst * 1e6:.0f} µs",
                     f"{out_mask * 1e6:.0f} / {out_worst * 1e6:.0f} µs", "", ""])
    return [row[:3] for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-schema", type=int, default=20, help="sampled answers per schema (5 schemas)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the answers")
    parser.add_argument("--max-tokens", type=int, default=120, help="token limit of each answer")
    parser.add_argument("--engine-repeats", type=int, default=5, help="repeats of the grammar-engine timings")
    args = parser.parse_args()
    if args.per_schema < 1 or args.max_tokens < 1:
        parser.error("--per-schema and --max-tokens must be at least 1.")

    import jsonschema
    import torch

    from lmforge import AutoModelForCausalLM, AutoTokenizer
    from lmforge.generation import SamplingParams, generate

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    engine_rows = compare_engines(tokenizer, args.engine_repeats)
    print(markdown_table(["", "llguidance", "outlines-core"], engine_rows), flush=True)

    warm_up = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    generate(model, tokenizer, warm_up, SamplingParams(max_tokens=4, structured_outputs={"json_object": True}))
    rows, overheads, total_valid, total = [], [], 0, 0
    for name, (schema, question, _) in SCHEMAS.items():
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True)
        valid, tokens, constrained_s, free_s = 0, 0, 0.0, 0.0
        for seed in range(args.per_schema):
            params = SamplingParams(temperature=args.temperature, seed=seed, max_tokens=args.max_tokens,
                                    structured_outputs={"json": schema})
            start = time.perf_counter()
            completion = generate(model, tokenizer, prompt, params)[0].outputs[0]
            constrained_s += time.perf_counter() - start
            try:
                jsonschema.validate(json.loads(completion.text), schema)
                valid += 1
            except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
                print(f"  invalid ({completion.finish_reason}): {completion.text!r}: {exc}", flush=True)
            free = SamplingParams(temperature=args.temperature, seed=seed, max_tokens=len(completion.token_ids),
                                  ignore_eos=True)
            start = time.perf_counter()
            generate(model, tokenizer, prompt, free)
            free_s += time.perf_counter() - start
            tokens += len(completion.token_ids)
        overhead = constrained_s / free_s - 1
        overheads.append(overhead)
        total_valid, total = total_valid + valid, total + args.per_schema
        rows.append([name, f"{valid}/{args.per_schema}", f"{tokens / args.per_schema:.0f}",
                     f"{constrained_s / tokens * 1e3:.1f}", f"{free_s / tokens * 1e3:.1f}", f"{overhead:+.1%}"])
        print(rows[-1], flush=True)
    rows.append(["all", f"{total_valid}/{total} ({total_valid / total:.0%})", "", "", "",
                 f"{statistics.mean(overheads):+.1%} (mean)"])

    write_section("structured", f"""
## Structured output (`benchmarks/structured.py`)

{machine_line()}. Grammar engines on SmolLM2's {tokenizer.vocab_size:,}-token vocabulary, following a valid
answer of each schema token by token (median of {args.engine_repeats} runs; mask = the allowed-token bitmask of
one step):

{markdown_table(["", "llguidance (used by lmforge)", "outlines-core"], engine_rows)}

lmforge constrained decoding with SmolLM2-135M-Instruct (fp32): {args.per_schema} answers per schema sampled at
temperature {args.temperature} (seeds 0..{args.per_schema - 1}), at most {args.max_tokens} tokens each. Valid =
parses as JSON and validates against the schema (jsonschema). Overhead: each constrained generation against an
unconstrained one of the same prompt and the same number of tokens (ignore_eos), run one after the other; time
per token includes the prompt's prefill.

{markdown_table(["schema", "valid", "tokens per answer", "ms/token constrained", "ms/token free", "overhead"],
                rows)}
""")


if __name__ == "__main__":
    main()
