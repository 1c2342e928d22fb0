"""Training speed on this CPU: lmforge's Trainer next to HF transformers' Trainer, same model, data and optimizer.

Both train the same ~10M-parameter Llama-style decoder (vocabulary 16384, 8 layers, width 256, GQA 8/4
heads, tied embeddings) from the same initial weights on the same random token blocks of --seq-len
tokens, batch --batch, AdamW (lr 3e-4, weight decay 0.01, linear schedule), gradient clipping at 1.0,
float32, for --steps optimizer steps; the first --warmup steps are not timed. Each system runs in its
own process, so the peak RSS is its own; the systems take turns --repeats times, so that a slow spell
of a shared machine does not land on one of them only. Reported: training tokens/s (median over the
timed steps, then over the repeats), peak RSS, and the losses of the first and last step (the two must
agree: same weights, same data).
Writes the table to docs/benchmarks.md (section "train").
Usage: python -m benchmarks.train [--steps 12] [--warmup 2] [--batch 8] [--seq-len 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
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

SYSTEMS = ("lmforge Trainer", "HF transformers Trainer")
CONFIG = {"vocab_size": 16384, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 8,
          "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512,
          "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "pad_token_id": 0}
LEARNING_RATE, WEIGHT_DECAY, SEED = 3e-4, 0.01, 0


def token_blocks(args) -> list[list[int]]:
    generator = torch.Generator().manual_seed(SEED)
    count = args.batch * args.steps
    return torch.randint(1, CONFIG["vocab_size"], (count, args.seq_len), generator=generator).tolist()


def initial_weights(folder: str) -> None:
    """One set of initial weights for both systems: an lmforge model saved in HF layout."""
    from lmforge.config import LlamaConfig
    from lmforge.models.llama import LlamaForCausalLM

    torch.manual_seed(SEED)
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(folder)


class StepClock:
    """Wall time and loss of every optimizer step."""

    def __init__(self):
        self.last, self.durations, self.losses = time.perf_counter(), [], []

    def tick(self, loss: float) -> None:
        now = time.perf_counter()
        self.durations.append(now - self.last)
        self.losses.append(loss)
        self.last = now


def train_lmforge(folder: str, blocks, args, clock: StepClock) -> None:
    from lmforge import AutoModelForCausalLM
    from lmforge.train import (
        PaddingCollator,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    class Clock(TrainerCallback):
        def on_step_end(self, trainer):
            clock.tick(trainer.state.loss)

    model = AutoModelForCausalLM.from_pretrained(folder)
    arguments = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=args.steps,
                                  per_device_batch_size=args.batch, learning_rate=LEARNING_RATE,
                                  weight_decay=WEIGHT_DECAY, lr_scheduler="linear", max_grad_norm=1.0,
                                  logging_steps=0, progress=False, seed=SEED)
    examples = [{"input_ids": block} for block in blocks]
    trainer = Trainer(model, arguments, examples, PaddingCollator(pad_token_id=0, causal_lm_labels=True),
                      callbacks=[Clock()])
    clock.last = time.perf_counter()
    trainer.train()


def train_hf(folder: str, blocks, args, clock: StepClock) -> None:
    import transformers

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, arguments, state, control, **kwargs):
            control.should_log = True

        def on_log(self, arguments, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.tick(logs["loss"])

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    arguments = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, lr_scheduler_type="linear", max_grad_norm=1.0,
        optim="adamw_torch", bf16=False, fp16=False, use_cpu=True, save_strategy="no", report_to=[],
        logging_steps=1, disable_tqdm=True, seed=SEED, dataloader_num_workers=0)
    dataset = [{"input_ids": torch.tensor(block), "labels": torch.tensor(block)} for block in blocks]
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=dataset, callbacks=[Clock()])
    clock.last = time.perf_counter()
    trainer.train()


def step_result(clock: StepClock, warmup: int, tokens_per_step: float) -> dict:
    """Tokens/s over the median timed step, this process's peak RSS, first and last loss."""
    return {"tokens_per_second": tokens_per_step / statistics.median(clock.durations[warmup:]),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "first_loss": clock.losses[0], "last_loss": clock.losses[-1], "steps": len(clock.losses)}


def speed_table(results: dict[str, dict], steps: int) -> str:
    rows = [[name, f"{r['tokens_per_second']:.0f}", f"{r['peak_rss'] / 2**20:.0f}",
             f"{r['first_loss']:.4f}", f"{r['last_loss']:.4f}"] for name, r in results.items()]
    return markdown_table(["system", "train tokens/s", "peak RSS MB", "loss step 1", f"loss step {steps}"], rows)


def measure(system: str, args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        initial_weights(folder)
        blocks = token_blocks(args)
        clock = StepClock()
        (train_lmforge if system == SYSTEMS[0] else train_hf)(folder, blocks, args, clock)
    return step_result(clock, args.warmup, args.batch * args.seq_len)


def interleaved(module: str, systems: tuple[str, ...], argv: list[str], repeats: int) -> dict[str, dict]:
    """`run_each` `repeats` times in turn; each system's first result with the median tokens/s of all."""
    runs = [run_each(module, systems, argv) for _ in range(repeats)]
    results = {}
    for system in systems:
        speeds = [run[system]["tokens_per_second"] for run in runs]
        results[system] = {**runs[0][system], "tokens_per_second": statistics.median(speeds), "runs": speeds}
    return results


def write_report(results: dict[str, dict], args) -> None:
    table = speed_table(results, args.steps)
    runs = "; ".join(f"{name} " + ", ".join(f"{speed:.0f}" for speed in r["runs"]) for name, r in results.items())
    from lmforge.config import LlamaConfig
    from lmforge.models.llama import LlamaForCausalLM

    parameters = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**CONFIG)).parameters())
    write_section("train", f"""
## Training speed: lmforge Trainer vs HF Trainer (`benchmarks/train.py`)

{machine_line()}. A {parameters / 1e6:.1f}M-parameter Llama-style decoder trained from the same initial
weights on the same random blocks: batch {args.batch} × {args.seq_len} tokens, AdamW lr {LEARNING_RATE}, linear
schedule, clipping 1.0, float32, {args.steps} steps of which the first {args.warmup} are not timed; each system
in its own process, the two taking turns {args.repeats} times. Tokens/s is the median over timed steps, then
over the {args.repeats} runs (each run's: {runs}).

{table}
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per system")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each system, taking turns")
    parser.add_argument("--only", choices=SYSTEMS, help=argparse.SUPPRESS)  # run one system in this process
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) to time any step.")
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    write_report(interleaved("benchmarks.train", SYSTEMS, forwarded_options(args), args.repeats), args)


if __name__ == "__main__":
    main()
