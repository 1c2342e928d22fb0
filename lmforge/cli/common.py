"""What `lmforge generate` and `lmforge chat` share: sampling flags, model loading, streaming.

Every sampling flag is named after its `SamplingParams` field (`--top-p` → `top_p`), so the
command line, the Python API and the server speak the same vocabulary. Generated text goes
to stdout as it is produced; everything else (timings, logprobs) goes to stderr, so
`lmforge generate ... > answer.txt` captures the answer alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

from lmforge.errors import UnsupportedError
from lmforge.generation.sampler import TokenLogprob
from lmforge.generation.sampling_params import SamplingParams
from lmforge.sources import DEFAULT_MODEL

DEFAULTS = SamplingParams()
QUANTIZATION_CHOICES = ("int8", "int4", "nf4", "gguf")  # --quantization: a method, or a GGUF file's own blocks
CLI_MAX_TOKENS = 256  # SamplingParams' 16 cuts nearly every answer short

# (flag, type, help) for the flags that keep SamplingParams' default; the flag names the field (--top-p → top_p).
SAMPLING_FLAGS: list[tuple[str, type, str]] = [
    ("--temperature", float, "0 = greedy (always the most likely token); < 1 sharpens, > 1 flattens"),
    ("--top-p", float, "nucleus sampling: keep the smallest set of tokens whose probabilities sum to P"),
    ("--top-k", int, "keep only the K most likely tokens; 0 = off"),
    ("--min-p", float, "drop tokens less likely than MIN_P times the most likely one"),
    ("--repetition-penalty", float, "> 1 discourages tokens already in the prompt or output; 1 = off"),
    ("--presence-penalty", float, "in [-2, 2]: subtracted once from every token already generated"),
    ("--frequency-penalty", float, "in [-2, 2]: subtracted per occurrence of a generated token"),
    ("--min-tokens", int, "end-of-sequence and stop strings are ignored until this many tokens exist"),
    ("--seed", int, "makes sampling reproducible"),
]


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"embedded short name, HF model folder or .gguf file (default: {DEFAULT_MODEL})")


def add_quantization_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default=None,
                        help="quantize the model's Linear layers at load time; gguf keeps a GGUF file's own "
                             "Q8_0/Q4_1/Q4_0 blocks (default: none)")
    parser.add_argument("--adapter", metavar="DIR",
                        help="an adapter folder in the PEFT layout (LoRA, prompt or prefix tuning; from "
                             "`lmforge sft` or peft) to apply to the model")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (SamplingParams fields)")
    group.add_argument("--max-tokens", type=int, default=CLI_MAX_TOKENS, metavar="N",
                       help=f"most new tokens per answer (default: {CLI_MAX_TOKENS})")
    for flag, kind, text in SAMPLING_FLAGS:
        default = getattr(DEFAULTS, flag[2:].replace("-", "_"))
        group.add_argument(flag, type=kind, metavar="N" if kind is int else "X",
                           help=f"{text} (default: {'random' if default is None else default})")
    group.add_argument("--num-beams", type=int, metavar="N",
                       help="beam search with this many beams (deterministic, printed when complete; default: 1)")
    group.add_argument("--stop", action="append", metavar="TEXT",
                       help="end the answer before this text; repeat for several stop strings")
    group.add_argument("--logprobs", type=int, metavar="N",
                       help="print each generated token's logprob and its N most likely alternatives to stderr")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from the flags that were given; SamplingParams validates them (ValidationError)."""
    names = ["max_tokens", "num_beams", "stop", "logprobs"]
    names += [flag[2:].replace("-", "_") for flag, _, _ in SAMPLING_FLAGS]
    return SamplingParams(**{name: getattr(args, name) for name in names if getattr(args, name) is not None})


def load_generator(ref: str, quantization: str | None = None, adapter: str | None = None):
    """Tokenizer and a text-generating model (causal LM, else seq2seq LM) for `ref`, quantized as asked (see
    `--quantization`), with a PEFT `adapter` folder (LoRA, prompt or prefix tuning) applied, timed on stderr.

    Over a floating-point base a LoRA adapter is merged into the weights (as fast as the base model);
    over a quantized one it stays a separate update, since merging would round it into the format."""
    from lmforge import AutoTokenizer
    from lmforge.quant import load_quantized, parameter_count, quantize_loaded
    from lmforge.registry import MODEL_REGISTRY, config_class
    from lmforge.sources import load_config

    start = time.perf_counter()
    model_type = load_config(ref).get("model_type")
    config_class(model_type)  # an unknown architecture fails here, with the list of supported ones
    tasks = MODEL_REGISTRY[model_type]
    task = next((t for t in ("causal-lm", "seq2seq-lm") if t in tasks), None)
    if task is None:
        raise UnsupportedError(f"{ref} is a {model_type} model, which cannot generate text (it has no causal-lm "
                               f"or seq2seq-lm head); pick a decoder such as {DEFAULT_MODEL}.")
    tokenizer = AutoTokenizer.from_pretrained(ref)
    if task == "causal-lm":
        model = load_quantized(ref, quantization=quantization)
    else:
        model = tasks[task].from_pretrained(ref)
        quantize_loaded(model, quantization)
    if adapter is not None:
        from lmforge.peft import load_peft_adapter, merge_and_unload

        if load_peft_adapter(model, adapter) == "LORA" and not quantization:
            merge_and_unload(model)
    how = f", {quantization}" if quantization else ""
    how += f", adapter {adapter}" if adapter else ""
    note(f"loaded {ref} ({type(model).__name__}{how}, {parameter_count(model) / 1e6:.1f}M parameters) "
         f"in {time.perf_counter() - start:.1f}s")
    return model, tokenizer


def note(text: str) -> None:
    """A diagnostic line on stderr (never on stdout, which carries only generated text)."""
    print(f"lmforge: {text}", file=sys.stderr, flush=True)


@dataclass
class Answer:
    """One generated answer and what it cost."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", or "interrupted" (Ctrl-C)
    logprobs: list[TokenLogprob] | None = None
    first_token_s: float | None = None
    total_s: float = 0.0


def write_answer(model, tokenizer, prompt_ids: list[int], params: SamplingParams,
                 interruptible: bool = False) -> Answer:
    """Generate an answer, writing its text to stdout as it appears (flushed per delta).

    Beam search needs every beam finished before it knows the best one, so with
    num_beams > 1 the whole text is written at the end. With `interruptible`, Ctrl-C
    ends the answer early and returns what exists so far instead of raising.
    """
    from lmforge.generation.generate import generate, generate_steps

    answer, start = Answer(), time.perf_counter()
    try:
        if params.num_beams > 1:
            output = generate(model, tokenizer, prompt_ids, params)[0].outputs[0]
            answer.text, answer.token_ids = output.text, output.token_ids
            answer.finish_reason, answer.logprobs = output.finish_reason, output.logprobs
            _emit(answer.text)
        else:
            for sequence, step in generate_steps(model, tokenizer, [prompt_ids], params):
                if answer.first_token_s is None:
                    answer.first_token_s = time.perf_counter() - start
                answer.token_ids, answer.logprobs = sequence.output.token_ids, sequence.logprobs
                answer.finish_reason = step.finish_reason
                if step.delta:
                    answer.text += step.delta
                    _emit(step.delta)
    except KeyboardInterrupt:
        if not interruptible:
            raise
        answer.finish_reason = "interrupted"
    answer.total_s = time.perf_counter() - start
    return answer


def _emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def report(answer: Answer, tokenizer) -> None:
    """Token count, speed and finish reason on stderr; per-token logprobs when they were asked for."""
    if answer.logprobs:
        note("logprobs (token: logprob | top alternatives):")
        for entry in answer.logprobs:
            alternatives = ", ".join(f"{tokenizer.decode([t])!r} {lp:.3f}" for t, lp in entry.top)
            print(f"  {tokenizer.decode([entry.token_id])!r}: {entry.logprob:.3f}"
                  + (f" | {alternatives}" if alternatives else ""), file=sys.stderr)
    count = len(answer.token_ids)
    speed = f"{count / answer.total_s:.1f} tokens/s" if answer.total_s > 0 else "n/a"
    first = f", first token after {answer.first_token_s:.2f}s" if answer.first_token_s is not None else ""
    note(f"{count} tokens in {answer.total_s:.2f}s ({speed}{first}), finish reason: {answer.finish_reason}")
