"""LoRA SFT speed on this CPU: lmforge's SFTTrainer next to TRL's SFTTrainer with a PEFT LoRA, same everything.

Both fine-tune SmolLM2-135M-Instruct (the embedded GGUF, dequantized to float32 and saved once as an HF
folder that both load) with
LoRA r=8, alpha 16, no dropout, on every linear layer of the backbone, on the same rows of the dates
task (lmforge.align.tasks), tokenized once with the chat template into the same input ids and
answer-only loss mask (TRL gets them pre-tokenized, with `completion_mask`). Batch --batch rows
(padded per batch), AdamW lr 1e-3, constant schedule, float32, no gradient checkpointing (TRL's
defaults are bf16 and checkpointing; on this CPU bf16 matmuls are slow and both are set off),
--steps optimizer steps of which the first --warmup are not timed; each system in its own process.
Reported: tokens/s = the mean row length × batch / the median step time (both systems draw batches
of the same rows), peak RSS, and the first and last step's loss.
Writes the table to docs/benchmarks.md (section "sft-speed").
Usage: python -m benchmarks.sft_speed [--steps 14] [--warmup 2] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from benchmarks.report import forwarded_options, machine_line, run_each, write_section
from benchmarks.train import StepClock, speed_table, step_result

MODEL = "smollm2-135m-instruct"
SYSTEMS = ("lmforge SFTTrainer + LoRA", "TRL SFTTrainer + PEFT LoRA")
LEARNING_RATE, RANK, ALPHA, SEED = 1e-3, 8, 16, 0


def tokenized_rows(count: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels with -100 outside the answers) of `count` dates-task rows."""
    from lmforge import AutoTokenizer
    from lmforge.align.sft import tokenize_row
    from lmforge.align.tasks import date_rows

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    return [tokenize_row(row, number, tokenizer) for number, row in enumerate(date_rows(count, seed=SEED))]


def train_lmforge(rows, args, clock: StepClock) -> None:
    from lmforge import AutoModelForCausalLM, AutoTokenizer
    from lmforge.align import SFTConfig, SFTTrainer
    from lmforge.align.tasks import date_rows
    from lmforge.peft import LoraConfig, add_lora
    from lmforge.train import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, trainer):
            clock.tick(trainer.state.loss)

    model = AutoModelForCausalLM.from_pretrained(args.folder)
    add_lora(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"))
    config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_batch_size=args.batch,
                       learning_rate=LEARNING_RATE, lr_scheduler="constant", warmup_ratio=0.0, logging_steps=0,
                       progress=False, seed=SEED)
    trainer = SFTTrainer(model.train(), config, date_rows(len(rows), seed=SEED), AutoTokenizer.from_pretrained(MODEL),
                         callbacks=[Clock()])
    clock.last = time.perf_counter()
    trainer.train()


def train_trl(rows, args, clock: StepClock) -> None:
    import datasets
    import peft
    import transformers
    import trl

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, arguments, state, control, **kwargs):
            control.should_log = True

        def on_log(self, arguments, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.tick(logs["loss"])

    model = transformers.AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.folder)
    dataset = datasets.Dataset.from_list([{"input_ids": ids, "completion_mask": [int(label != -100) for label in labels]}
                                          for ids, labels in rows])
    config = trl.SFTConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, save_strategy="no", report_to=[],
        logging_steps=1, disable_tqdm=True, seed=SEED, dataloader_num_workers=0, max_length=None, packing=False,
        completion_only_loss=True)
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                           task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora, callbacks=[Clock()])
    clock.last = time.perf_counter()
    trainer.train()


def measure(system: str, args) -> dict:
    rows = tokenized_rows(args.batch * args.steps)
    clock = StepClock()
    (train_lmforge if system == SYSTEMS[0] else train_trl)(rows, args, clock)
    mean_length = sum(len(ids) for ids, _ in rows) / len(rows)
    return step_result(clock, args.warmup, args.batch * mean_length)


def write_report(results: dict[str, dict], args) -> None:
    table = speed_table(results, args.steps)
    import peft
    import trl

    write_section("sft-speed", f"""
## LoRA SFT speed: lmforge vs TRL + PEFT (`benchmarks/sft_speed.py`)

{machine_line()}, trl {trl.__version__}, peft {peft.__version__}. SmolLM2-135M-Instruct (float32), LoRA r={RANK}
alpha {ALPHA} on all linear layers, the same pre-tokenized dates-task rows (answer-only loss), batch {args.batch},
AdamW lr {LEARNING_RATE} constant, no gradient checkpointing, {args.steps} steps of which the first {args.warmup}
are not timed; each system in its own process. Tokens/s = mean row length × batch / median step time.
The step-1 losses agree (same weights, same first rows): the two compute the same training.

{table}
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=14, help="optimizer steps per system")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--only", choices=SYSTEMS, help=argparse.SUPPRESS)  # run one system in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)  # the HF folder both systems load
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) to time any step.")
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    from lmforge import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        AutoModelForCausalLM.from_pretrained(MODEL).save_pretrained(folder)
        AutoTokenizer.from_pretrained(MODEL).save_pretrained(folder)
        results = run_each("benchmarks.sft_speed", SYSTEMS, [*forwarded_options(args), f"--folder={folder}"])
    write_report(results, args)


if __name__ == "__main__":
    main()
