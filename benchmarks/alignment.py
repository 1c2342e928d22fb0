"""What prompting, prompt/prefix tuning, LoRA, QLoRA and full fine-tuning each buy on SmolLM2-135M-Instruct, on a task it fails.

The task is generated (lmforge.align.tasks): a date written in words → ISO 8601, scored by exact
match on held-out dates with greedy decoding. Each method runs in its own process (so its peak
RSS is its own) on this CPU:
- zero-shot: the instruction alone;
- few-shot: --shots solved training examples as earlier chat turns (no weight changes);
- prompt / prefix: SFT of 20 virtual tokens (a soft prompt, or keys/values at every layer) started
  from the tokens of a task description, the model frozen;
- lora / qlora / full: SFT on the training rows (answer-only loss) for --steps steps.
Then DPO on the format preference (bare ISO date over chatty answers): held-out preference
accuracy, and how often greedy answers are a bare YYYY-MM-DD before and after.
Writes the tables to docs/benchmarks.md (section "alignment").
Usage: python -m benchmarks.alignment [--steps 60] [--held-out 50] [--only METHOD]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import tempfile
import time

import torch

from benchmarks.report import (
    forwarded_options,
    machine_line,
    markdown_table,
    run_each,
    write_section,
)

MODEL = "smollm2-135m-instruct"
METHODS = ("zero-shot", "few-shot", "prompt", "prefix", "lora", "qlora", "full", "dpo")
LEARNING_RATES = {"prompt": 3e-2, "prefix": 1e-2, "lora": 1e-3, "qlora": 1e-3, "full": 5e-5, "dpo": 5e-5}
VIRTUAL_TOKENS = 20
INIT_TEXT = "Write the date in ISO 8601 format, YYYY-MM-DD, and nothing else."
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def answers(model, tokenizer, rows, shots: list[dict]) -> list[str]:
    """Greedy answers to each row's instruction, after `shots` as solved earlier turns (what
    `lmforge eval exact-match --shots K` runs)."""
    from lmforge.evaluation import evaluate_exact_match, few_shot_history

    result = evaluate_exact_match(model, tokenizer, rows, few_shot_history(shots), max_new_tokens=16)
    return [answer.strip() for answer in result.answers]


def measure(method: str, args) -> dict:
    from lmforge import AutoModelForCausalLM, AutoTokenizer
    from lmforge.align import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
    from lmforge.align.tasks import date_preferences, date_splits, exact_match
    from lmforge.peft import (
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        add_lora,
        add_prefix_tuning,
        add_prompt_tuning,
        trainable_summary,
    )
    from lmforge.quant import quantize_model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    train, held_out = date_splits(train=args.train, held_out=args.held_out)
    result = {"trainable": 0, "train_seconds": 0.0}
    shots = train[:args.shots] if method == "few-shot" else []
    if method == "dpo":
        add_lora(model, LoraConfig(r=8, target_modules="all-linear"))
        pairs = date_preferences(args.train + args.held_out)
        train_pairs, held_pairs = pairs[:args.train], pairs[args.train:]
        config = DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_batch_size=args.batch,
                           learning_rate=LEARNING_RATES["dpo"], beta=0.1, logging_steps=0, progress=False)
        trainer = DPOTrainer(model, config, train_pairs, tokenizer, eval_dataset=held_pairs)
        before, format_before = trainer.evaluate(), answers(model, tokenizer, held_out, [])
        clock = time.perf_counter()
        trainer.train()
        result.update(train_seconds=time.perf_counter() - clock, trainable=trainable_summary(model).trainable,
                      preference_before=before["preference_accuracy"],
                      preference_after=trainer.evaluate()["preference_accuracy"])
        result["iso_before"] = sum(bool(ISO.match(a)) for a in format_before) / len(held_out)
        model.eval()
        result["iso_after"] = sum(bool(ISO.match(a)) for a in answers(model, tokenizer, held_out, [])) / len(held_out)
    elif method in ("prompt", "prefix", "lora", "qlora", "full"):
        if method == "qlora":
            quantize_model(model, "nf4")
        if method == "prompt":
            add_prompt_tuning(model, PromptTuningConfig(VIRTUAL_TOKENS, init_text=INIT_TEXT), tokenizer)
        elif method == "prefix":
            add_prefix_tuning(model, PrefixTuningConfig(VIRTUAL_TOKENS, init_text=INIT_TEXT), tokenizer)
        elif method != "full":
            add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_batch_size=args.batch,
                           learning_rate=LEARNING_RATES[method], warmup_ratio=0.05, logging_steps=0, progress=False)
        trainer = SFTTrainer(model, config, train, tokenizer)
        clock = time.perf_counter()
        state = trainer.train()
        result.update(train_seconds=time.perf_counter() - clock, trainable=trainable_summary(model).trainable,
                      final_loss=state.loss)
        model.eval()
    if method != "dpo":
        predictions = answers(model, tokenizer, held_out, shots)
        result["exact_match"] = exact_match(predictions, held_out)
        result["examples"] = predictions[:3]
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def write_report(results: dict[str, dict], args) -> None:
    rows = [[method, f"{r['exact_match']:.0%}", f"{r['trainable']:,}", f"{r['peak_rss'] / 2**20:.0f}",
             f"{r['train_seconds'] / 60:.1f}", " / ".join(r["examples"])]
            for method, r in results.items() if "exact_match" in r]
    table = markdown_table(["method", "held-out exact match", "trainable parameters", "peak RSS MB",
                            "train minutes", "first answers"], rows)
    dpo = results.get("dpo")
    dpo_text = "" if dpo is None else (
        f"\nDPO (LoRA r=8, beta 0.1, {args.steps} steps, {dpo['train_seconds'] / 60:.1f} min) on the format "
        f"preference: held-out preference accuracy {dpo['preference_before']:.0%} → {dpo['preference_after']:.0%}; "
        f"greedy answers that are a bare YYYY-MM-DD {dpo['iso_before']:.0%} → {dpo['iso_after']:.0%}.\n")
    write_section("alignment", f"""
## Prompting vs fine-tuning on a task SmolLM2 fails (`benchmarks/alignment.py`)

{machine_line()}. Dates in words → ISO 8601 (`lmforge.align.tasks`), {args.train} training and
{args.held_out} held-out dates, greedy decoding, exact match. Few-shot shows {args.shots} solved examples as
earlier chat turns. SFT: {args.steps} steps of {args.batch} rows, answer-only loss; prompt/prefix tuning
{VIRTUAL_TOKENS} virtual tokens started from the tokens of "{INIT_TEXT}"; LoRA/QLoRA r=8 on all
linear layers (QLoRA: NF4 base). Learning rates {', '.join(f'{m} {lr:g}' for m, lr in LEARNING_RATES.items())}.
Each method in its own process.

{table}
{dpo_text}""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each trained method")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--train", type=int, default=400, help="training rows")
    parser.add_argument("--held-out", type=int, default=50, help="held-out rows")
    parser.add_argument("--shots", type=int, default=3, help="examples shown by few-shot prompting")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset to run")
    parser.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)  # one method in this process
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    write_report(run_each("benchmarks.alignment", args.methods.split(","), forwarded_options(args)), args)


if __name__ == "__main__":
    main()
