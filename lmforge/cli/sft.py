"""`lmforge sft`: supervised fine-tuning of a chat model on instruction/response examples.

--data is a .json or .jsonl file of rows shaped {"instruction", "input" (optional), "response"},
{"messages": [...]} or {"prompt", "completion"}; the loss counts the answers only. --method picks
what trains: full (every weight), lora (low-rank updates of frozen linear layers), qlora (LoRA
over a base quantized to NF4, for the least memory), prompt (a learned soft prompt of virtual
tokens) or prefix (learned keys/values of virtual tokens at every layer). A seeded held-out part of
the rows measures the loss after training. --out receives, for full, a model folder (config.json,
model.safetensors, tokenizer); for the others a PEFT adapter folder (adapter_config.json,
adapter_model.safetensors) that lmforge (`lmforge generate --model BASE --adapter DIR`) and the peft
library load onto the base model, or for lora/qlora with --merge a full model folder with the
updates folded in. sft.json records the run.
Without --data, the rows are the generated dates task (dates in words → ISO 8601).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.cli.common import note
from lmforge.cli.option_files import add_config_argument
from lmforge.errors import ValidationError

DEFAULT_MODEL = "smollm2-135m-instruct"
METHODS = {"full": "every weight", "lora": "low-rank updates of frozen layers",
           "qlora": "LoRA over an NF4-quantized base", "prompt": "a soft prompt of virtual tokens",
           "prefix": "keys/values of virtual tokens at every layer"}
LEARNING_RATES = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4, "prompt": 3e-2, "prefix": 1e-2}
VIRTUAL_TOKEN_METHODS = ("prompt", "prefix")
RECORD = "sft.json"

EXAMPLES = """examples:
  lmforge sft --method lora --max-steps 60 --out dates-lora
  lmforge sft --data chats.jsonl --method qlora --lora-r 16 --epochs 2 --packing --out chat-qlora
  lmforge sft --data alpaca.json --method lora --merge --out merged-model
  lmforge sft --method prompt --num-virtual-tokens 20 --init-text "Write the date as YYYY-MM-DD" --out dates-prompt
  lmforge sft path/to/hf-folder --data rows.jsonl --method full --overlong truncate --max-length 512 --out tuned
  lmforge sft --config run.yaml --lr 1e-4       (run.yaml: `method: lora`, `lora-r: 16`, `out: runs/a`, ...)
  lmforge generate --adapter dates-lora "Write this date in ISO format (YYYY-MM-DD): the first of May, 1999"
"""


def _validation(text: str) -> float | int:
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def add_alignment_arguments(parser: argparse.ArgumentParser, data_help: str,
                            learning_rates: dict[str, float], lora_dropout: float = 0.05) -> None:
    """The options the alignment commands share: model, method (those `learning_rates` names), data, LoRA
    (dropout `lora_dropout` by default), training, output."""
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"embedded short name, HF model folder or .gguf file (default: {DEFAULT_MODEL})")
    parser.add_argument("--method", required=True, choices=tuple(learning_rates),
                        help="; ".join(f"{method}: {METHODS[method]}" for method in learning_rates))
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="FILE", help=data_help)
    data.add_argument("--validation", type=_validation, default=0.1, metavar="X",
                      help="held-out fraction (0 < X < 1) or number of rows (default: 0.1)")
    data.add_argument("--max-length", type=int, metavar="N", help="longest example in tokens (default: the "
                                                                  "model's positions)")
    data.add_argument("--overlong", choices=("error", "truncate", "skip"), default="error",
                      help="what to do with a longer example (default: error)")
    lora = parser.add_argument_group("lora / qlora")
    lora.add_argument("--lora-r", type=int, default=8, metavar="R", help="rank of the updates (default: 8)")
    lora.add_argument("--lora-alpha", type=float, default=16.0, metavar="A", help="scaling alpha/r (default: 16)")
    lora.add_argument("--lora-dropout", type=float, default=lora_dropout, metavar="P",
                      help=f"dropout before A (default: {lora_dropout:g})")
    lora.add_argument("--target-modules", default="all-linear", metavar="NAMES",
                      help="comma-separated layer names (e.g. q_proj,v_proj) or all-linear (default)")
    lora.add_argument("--merge", action="store_true", help="write a full model with the updates folded in, "
                                                           "instead of an adapter folder")
    training = parser.add_argument_group("training")
    length = training.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, metavar="N", help="passes over the training rows (default: 1)")
    length.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps instead of epochs")
    training.add_argument("--lr", type=float, metavar="X", help="peak learning rate (default: "
                          + ", ".join(f"{m} {lr:g}" for m, lr in learning_rates.items()) + ")")
    training.add_argument("--batch-size", type=int, default=8, metavar="N", help="rows per step (default: 8)")
    training.add_argument("--seed", type=int, default=0, help="for the split, the adapters and the data order")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    parser.add_argument("--force", action="store_true", help="replace --out when it exists and is not empty")
    add_config_argument(parser)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("sft", help="supervised fine-tuning on instruction/response data (full, LoRA, "
                                   "QLoRA)", description=__doc__, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_alignment_arguments(parser, ".json or .jsonl rows (default: the generated dates task, 400 rows)",
                            LEARNING_RATES)
    parser.add_argument("--packing", action="store_true", help="lay training examples end to end in rows of "
                        "--max-length tokens (default 1024) instead of padding; attention stays inside each example")
    virtual = parser.add_argument_group("prompt / prefix")
    virtual.add_argument("--num-virtual-tokens", type=int, default=20, metavar="P",
                         help="how many virtual tokens are learned (default: 20)")
    virtual.add_argument("--init-text", metavar="TEXT", help="start them from this text's tokens (e.g. a "
                         "description of the task; default: random vocabulary tokens)")
    virtual.add_argument("--prefix-projection", action="store_true", help="prefix: produce the keys/values "
                         "with a small MLP while training (steadier, more to train)")
    parser.set_defaults(handler=handle)


def load_rows(args: argparse.Namespace) -> tuple[list[dict], str]:
    from lmforge.align import read_rows
    from lmforge.align.tasks import date_rows

    if args.data is None:
        return date_rows(400, seed=args.seed), "the dates task (generated)"
    return read_rows(args.data), args.data


def split_rows(rows: list[dict], validation: float | int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle, then the held-out rows off the end."""
    count = validation if isinstance(validation, int) else round(len(rows) * validation)
    if not (isinstance(validation, int) or 0 < validation < 1) or not 1 <= count < len(rows):
        raise ValidationError(f"--validation {validation} leaves no training or no held-out row out of {len(rows)}; "
                              "give a fraction between 0 and 1 or a smaller count.")
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    return shuffled[:-count], shuffled[-count:]


def prepare_model(args: argparse.Namespace, task: str = "causal-lm", tokenizer=None):
    """The model to train, loaded in float32: the language model, or for task="sequence-classification"
    its backbone under a new one-score head (a reward model). Quantized to NF4 for qlora, with LoRA
    layers for lora/qlora (a new score head trains fully beside them), with virtual tokens for prompt
    and prefix (started from --init-text, which needs the `tokenizer`)."""
    from lmforge import AutoModelForCausalLM, AutoModelForSequenceClassification
    from lmforge.align.reward import REWARD_HEAD
    from lmforge.peft import LoraConfig, add_lora
    from lmforge.quant import quantize_model

    scorer = task == "sequence-classification"
    if args.method in VIRTUAL_TOKEN_METHODS:
        return _virtual_token_model(args, tokenizer)
    lora = None
    if args.method != "full":  # check the LoRA settings before the model loads
        targets = args.target_modules if args.target_modules == "all-linear" else [
            name.strip() for name in args.target_modules.split(",") if name.strip()]
        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=targets, modules_to_save=(REWARD_HEAD,) if scorer else ())
    elif args.merge:
        raise ValidationError("--merge folds LoRA updates into the model; --method full has none. Leave it out.")
    if scorer:
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model)
    if args.method == "qlora":  # a new score head stays float: it trains fully beside the adapters
        quantize_model(model, "nf4", keep_float=(REWARD_HEAD,) if scorer else ())
    if lora is not None:
        add_lora(model, lora)
    return model


def _virtual_token_model(args: argparse.Namespace, tokenizer):
    from lmforge import AutoModelForCausalLM
    from lmforge.peft import PrefixTuningConfig, PromptTuningConfig, add_prefix_tuning, add_prompt_tuning

    if args.merge:
        raise ValidationError(f"--merge folds LoRA updates into the weights; --method {args.method} learns virtual "
                              "tokens, which have no weights to fold into. Leave --merge out.")
    if getattr(args, "packing", False):
        raise ValidationError(f"--packing lays several examples in one row, but every example must see the virtual "
                              f"tokens of --method {args.method} from its start; leave --packing out.")
    if args.method == "prompt":  # check the settings before the model loads
        config = PromptTuningConfig(args.num_virtual_tokens, init_text=args.init_text, seed=args.seed)
    else:
        config = PrefixTuningConfig(args.num_virtual_tokens, prefix_projection=args.prefix_projection,
                                    init_text=args.init_text, seed=args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    add = add_prompt_tuning if args.method == "prompt" else add_prefix_tuning
    return add(model, config, tokenizer)


def save_trained(model, tokenizer, args: argparse.Namespace, folder: Path) -> Path:
    """The result into `folder`: a model folder (full, or --merge) or a PEFT adapter folder, with the tokenizer."""
    from lmforge.peft import merge_and_unload, save_peft_adapter
    from lmforge.quant.checkpoint import save_quantized

    if args.method == "full" or args.merge:
        merged = merge_and_unload(model) if args.merge else model
        if args.method == "qlora":
            return save_quantized(merged, folder, tokenizer)
        merged.save_pretrained(folder)
    else:
        save_peft_adapter(model, folder, base_model_name_or_path=args.model)
    tokenizer.save_pretrained(folder)
    return folder


def publish(staged: Path, out: Path, record: dict, name: str) -> None:
    """Write the run record into the staged folder and move it to `out` in one rename."""
    (staged / name).write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staged.rename(out)
    note(f"saved {out}: {', '.join(sorted(path.name for path in out.iterdir()))}")


@dataclass
class Run:
    """What an alignment command has set up before training: output folder, data, model, tokenizer."""

    out: Path
    origin: str
    train: list[dict]
    held_out: list[dict]
    tokenizer: Any
    model: Any
    summary: Any
    started: float

    def record(self, args: argparse.Namespace, config, state, seconds: float, **fields: Any) -> dict:
        """The run's JSON record: what trained on what, for how long, and `fields` (the results)."""
        return {"model": args.model, "method": args.method, "data": self.origin, "train_examples": len(self.train),
                "held_out_examples": len(self.held_out), "learning_rate": config.learning_rate,
                "steps": state.global_step, "train_seconds": round(seconds, 3),
                "total_seconds": round(time.perf_counter() - self.started, 3),
                "trainable_parameters": self.summary.trainable, "total_parameters": self.summary.total, **fields}

    @contextmanager
    def workspace(self) -> Iterator[Path]:
        """A temporary folder beside --out where the run stages its files (removed afterwards)."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{self.out.name}.partial-", dir=self.out.parent) as work:
            yield Path(work)


def training_config(config_class, args: argparse.Namespace, work: Path, learning_rates: dict[str, float],
                    **extra: Any):
    """The run's SFTConfig / DPOConfig / RewardConfig from the shared options (and `extra` fields)."""
    learning_rate = args.lr if args.lr is not None else learning_rates[args.method]
    return config_class(output_dir=work / "training", learning_rate=learning_rate, warmup_ratio=0.05,
                        num_epochs=None if args.max_steps else (args.epochs or 1), max_steps=args.max_steps,
                        per_device_batch_size=args.batch_size, seed=args.seed, logging_steps=5,
                        max_length=args.max_length, overlong=args.overlong, **extra)


def train_measured(trainer) -> tuple[dict, Any, float, dict]:
    """Held-out metrics before, the training state, the training seconds, held-out metrics after."""
    before = trainer.evaluate()
    started = time.perf_counter()
    state = trainer.train()
    seconds = time.perf_counter() - started
    after = trainer.evaluate()
    print(f"training    {state.global_step} steps in {seconds:.1f} s, last loss {state.loss:.4f}")
    return before, state, seconds, after


def start_run(args: argparse.Namespace, rows: list[dict], origin: str, unit: str, task: str = "causal-lm") -> Run:
    """Check --out, split the rows, load tokenizer and model (`task`, prepared for --method), print the summary."""
    import torch

    from lmforge import AutoTokenizer
    from lmforge.peft import trainable_summary
    from lmforge.quant.checkpoint import check_output_folder

    out = check_output_folder(args.out, args.force)
    train, held_out = split_rows(rows, args.validation, args.seed)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = prepare_model(args, task, tokenizer)
    summary = trainable_summary(model)
    print(f"model       {args.model} ({args.method}): {summary}")
    print(f"data        {origin}: {len(train)} training, {len(held_out)} held-out {unit}", flush=True)
    return Run(out, origin, train, held_out, tokenizer, model, summary, started)


def handle(args: argparse.Namespace) -> int:
    from lmforge.align import SFTConfig, SFTTrainer

    run = start_run(args, *load_rows(args), unit="rows")
    train_rows, held_out, tokenizer, model = run.train, run.held_out, run.tokenizer, run.model
    with run.workspace() as work:
        config = training_config(SFTConfig, args, work, LEARNING_RATES, packing=args.packing)
        trainer = SFTTrainer(model, config, train_rows, tokenizer, eval_dataset=held_out)
        report = trainer.report
        if report.truncated or report.skipped:
            note(f"{report.truncated} rows truncated, {report.skipped} skipped as longer than the maximum length")
        before, state, seconds, after = train_measured(trainer)
        print(f"held-out    answer loss {before['loss']:.4f} -> {after['loss']:.4f} ({len(held_out)} rows)")
        staged = save_trained(model, tokenizer, args, work / "result")
        record = run.record(args, config, state, seconds, held_out_loss_before=before["loss"],
                            held_out_loss_after=after["loss"], rows_truncated=report.truncated,
                            rows_skipped=report.skipped)
        publish(staged, run.out, record, RECORD)
    return 0
