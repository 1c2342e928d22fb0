"""What each context strategy sends, and what it keeps, over a scripted conversation with SmolLM2-135M-Instruct.

The conversation (about 2k tokens in all) first states --facts facts, one per exchange, each with a chatty
scripted reply; then it asks about each fact in turn (the scripted replies answer correctly, so the history
stays the same for every strategy). Before every user turn, each strategy chooses what to send with a
--window-token model (minus --reserve for the answer); `full` sends everything with no window. Measured:
- tokens sent, summed over the turns (and the model's own calls for `summarize` and `state`), vs full;
- facts kept (primary): on each question turn, whether the asked fact's key word is in the prompt sent;
- answered (secondary): whether the model's greedy answer to that prompt contains the key word.
Writes the table to docs/benchmarks.md (section "context").
Usage: python -m benchmarks.context [--facts 12] [--window 512] [--reserve 64]
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.report import machine_line, markdown_table, write_section

MODEL = "smollm2-135m-instruct"
FACTS = [("My cat is called Pixel.", "What is my cat called?", "Pixel"),
         ("I was born in Lisbon.", "Where was I born?", "Lisbon"),
         ("My favourite colour is teal.", "What is my favourite colour?", "teal"),
         ("I work as a glassblower.", "What is my job?", "glassblower"),
         ("My sister's name is Ingrid.", "What is my sister's name?", "Ingrid"),
         ("I drive a yellow tractor.", "What do I drive?", "tractor"),
         ("My lucky number is 47.", "What is my lucky number?", "47"),
         ("I am allergic to peanuts.", "What am I allergic to?", "peanuts"),
         ("My dog is named Biscuit.", "What is my dog's name?", "Biscuit"),
         ("I play the cello.", "Which instrument do I play?", "cello"),
         ("My first car was a Fiat.", "What was my first car?", "Fiat"),
         ("I grew up near Oslo.", "Where did I grow up?", "Oslo")]
REPLY = ("Thank you for sharing that with me! It is always nice to learn a little more about the people I talk "
         "with. I will keep it in mind for the rest of our conversation. Is there anything else you would like "
         "to tell me about yourself today?")
STRATEGIES = ("full", "truncate", "window", "summarize", "state")


def script(count: int) -> list[tuple[str, str, str | None]]:
    """(user message, scripted reply, key word asked about or None) for every exchange."""
    facts = FACTS[:count]
    return ([(fact, REPLY, None) for fact, _, _ in facts]
            + [(question, f"You told me: {fact}", key) for fact, question, key in facts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, default=12, help=f"facts stated, then asked about (at most {len(FACTS)})")
    parser.add_argument("--window", type=int, default=512, help="context window the strategies must fit")
    parser.add_argument("--reserve", type=int, default=64, help="tokens reserved for each answer")
    args = parser.parse_args()
    if not 1 <= args.facts <= len(FACTS):
        parser.error(f"--facts must be between 1 and {len(FACTS)}.")

    from lmforge import AutoModelForCausalLM, AutoTokenizer
    from lmforge.context.state import StatefulContext
    from lmforge.context.strategies import ContextPolicy, prompt_tokens, select_context
    from lmforge.context.summary import SummarizedContext
    from lmforge.generation import SamplingParams, generate
    from lmforge.generation.chat import ChatHistory

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    summarizer = SummarizedContext(model, tokenizer, args.reserve, keep_turns=2, summary_tokens=96)
    stateful = StatefulContext(model, tokenizer, args.reserve, keep_turns=1)
    selectors = {
        "full": lambda h: select_context(h, tokenizer, model.config.context_length,
                                         ContextPolicy("full", reserve_output=args.reserve)),
        "truncate": lambda h: select_context(h, tokenizer, args.window, ContextPolicy("truncate",
                                                                                      reserve_output=args.reserve)),
        "window": lambda h: select_context(h, tokenizer, args.window, ContextPolicy("window", max_turns=4,
                                                                                    reserve_output=args.reserve)),
        "summarize": lambda h: summarizer.select(h, args.window),
        "state": lambda h: stateful.select(h, args.window)}
    results = {name: {"sent": 0, "kept": 0, "answered": 0, "questions": 0, "seconds": 0.0} for name in STRATEGIES}
    history = ChatHistory("You are a helpful assistant. Answer in one short sentence.")
    for user, reply, key in script(args.facts):
        history.add_user(user)
        for name in STRATEGIES:
            clock = time.perf_counter()
            sent = selectors[name](history)
            result = results[name]
            result["sent"] += sent.tokens
            if key is not None:
                result["questions"] += 1
                prompt = sent.history.to_prompt(tokenizer)
                result["kept"] += key.lower() in prompt.lower()
                answer = generate(model, tokenizer, prompt, SamplingParams(temperature=0.0, max_tokens=16))
                result["answered"] += key.lower() in answer[0].outputs[0].text.lower()
            result["seconds"] += time.perf_counter() - clock
        history.add_assistant(reply)
    results["summarize"]["sent"] += summarizer.spent.prompt + summarizer.spent.generated
    results["state"]["sent"] += stateful.spent.prompt + stateful.spent.generated
    total = prompt_tokens(tokenizer, history)
    full = results["full"]["sent"]
    rows = [[name, f"{r['sent']:,}", f"{r['sent'] / full:.0%}", f"{r['kept'] / r['questions']:.0%}",
             f"{r['answered'] / r['questions']:.0%}", f"{r['seconds']:.0f}"] for name, r in results.items()]
    table = markdown_table(["strategy", "tokens sent (all turns)", "vs full", "facts kept in the prompt",
                            "answered correctly", "seconds"], rows)
    print(table)
    write_section("context", f"""
## Context strategies: tokens sent and facts kept (`benchmarks/context.py`)

{machine_line()}. A scripted conversation with SmolLM2-135M-Instruct: {args.facts} facts stated one per
exchange (each with a chatty scripted reply), then asked about one by one; {total:,} tokens when the whole
history is rendered at the end. Before each user turn every strategy chooses what to send: `full` everything
(no window), the others within a {args.window}-token window minus {args.reserve} reserved for the answer —
`truncate` drops the oldest exchanges, `window` keeps the last 4, `summarize` keeps the last 2 word for word
and a running summary the model writes (its {summarizer.spent.prompt + summarizer.spent.generated:,} tokens of
summarization calls are included in its total), `state` keeps the last exchange and a JSON object of facts the
model extracts from each older exchange, constrained by a grammar (its {stateful.spent.prompt +
stateful.spent.generated:,} tokens of update calls are included; final state: `{json.dumps(stateful.state)}`).
"Facts kept": the asked fact's key word is in the prompt sent; "answered": the model's greedy answer (16 tokens)
contains it.

{table}
""")


if __name__ == "__main__":
    main()
