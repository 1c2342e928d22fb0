"""`lmforge finetune`: turn a pretrained model into a text classifier with a classic fine-tuning method.

The model gets a new classification head sized to the labels of the data, and --method decides
what trains: full (everything), frozen (only the head, on the backbone's features), partial (all
but the embeddings and the first --freeze-layers layers) or adapter (bottleneck adapters and the
head). A held-out part of the data measures accuracy and macro F1 after training. --out receives
a model folder that loads wherever one is accepted (AutoModelForSequenceClassification
.from_pretrained(DIR)), with the tokenizer, the training log and finetune.json (the run's record).
Without --data the examples are Python standard-library docstrings labelled by package.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from lmforge.cli.common import note
from lmforge.errors import InputError, ValidationError
from lmforge.peft.freezing import METHODS

DEFAULT_MODEL = "all-minilm-l6-v2"
LEARNING_RATES = {"full": 5e-5, "partial": 5e-5, "frozen": 1e-3, "adapter": 1e-3}  # usual starting points
RECORD = "finetune.json"

EXAMPLES = """examples:
  lmforge finetune --method adapter --out minilm-stdlib
  lmforge finetune all-minilm-l6-v2 --method partial --freeze-layers 4 --epochs 2 --out minilm-partial
  lmforge finetune --method full --data reviews.csv --text-column review --label-column stars --out reviews
  lmforge finetune path/to/hf-folder --method frozen --data tickets.jsonl --truncate --max-length 128 --out tickets
"""


def fraction_or_count(text: str) -> float | int:
    """--validation: a fraction below 1 (0.2), or a whole number of examples (50)."""
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="fine-tune a model as a text classifier (full, frozen, partial, "
                                   "adapter)", description=__doc__, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"embedded short name, HF model folder or .gguf file (default: {DEFAULT_MODEL})")
    parser.add_argument("--method", required=True, choices=METHODS,
                        help="full: train everything; frozen: only the new head; partial: freeze the embeddings "
                             "and the first --freeze-layers layers; adapter: only bottleneck adapters and the head")
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="FILE", help=".csv (with a header row) or .jsonl file of labelled texts "
                                                     "(default: standard-library docstrings labelled by package)")
    data.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    data.add_argument("--label-column", default="label", help="column holding the class (default: label)")
    data.add_argument("--validation", type=fraction_or_count, default=0.2, metavar="X",
                      help="held-out fraction (0 < X < 1) or number of examples (default: 0.2)")
    data.add_argument("--max-length", type=int, metavar="N",
                      help="longest example in tokens (default: the model's positions)")
    data.add_argument("--truncate", action="store_true", help="cut longer examples to --max-length instead of "
                                                              "stopping with an error")
    method = parser.add_argument_group("method options")
    method.add_argument("--freeze-layers", type=int, metavar="K",
                        help="partial: layers to freeze above the embeddings (default: half of them)")
    method.add_argument("--bottleneck", type=int, metavar="N", help="adapter: bottleneck width (default: 64)")
    method.add_argument("--adapter-where", choices=("attention", "ffn", "both"),
                        help="adapter: after the attention output, the feed-forward, or both (default: both)")
    training = parser.add_argument_group("training")
    length = training.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, metavar="N", help="passes over the training data (default: 3)")
    length.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps instead of epochs")
    training.add_argument("--lr", type=float, metavar="X", help="peak learning rate (default: "
                          + ", ".join(f"{m} {lr:g}" for m, lr in LEARNING_RATES.items()) + ")")
    training.add_argument("--batch-size", type=int, default=16, metavar="N", help="examples per step (default: 16)")
    training.add_argument("--seed", type=int, default=0,
                          help="seeds the split, the new weights, dropout and the data order (default: 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the model folder to write")
    parser.add_argument("--force", action="store_true", help="replace --out when it exists and is not empty")
    parser.set_defaults(handler=handle)


def check_counts(args: argparse.Namespace) -> None:
    """Counts must be >= 1 (checked before anything loads)."""
    for flag in ("--epochs", "--max-steps", "--batch-size", "--bottleneck"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < 1:
            raise ValidationError(f"{flag} must be >= 1, got {value}.")


def method_options(args: argparse.Namespace) -> dict:
    """The apply_method options given on the command line; one meant for another method is an error."""
    options = {"freeze_layers": args.freeze_layers, "bottleneck": args.bottleneck, "where": args.adapter_where}
    owners = {"freeze_layers": "partial", "bottleneck": "adapter", "where": "adapter"}
    for name, value in options.items():
        if value is not None and owners[name] != args.method:
            flag = "--adapter-where" if name == "where" else f"--{name.replace('_', '-')}"
            raise ValidationError(f"{flag} applies to --method {owners[name]}, not {args.method}; leave it out.")
    return {name: value for name, value in options.items() if value is not None}


def load_labelled_documents(args: argparse.Namespace) -> tuple[list, str]:
    """The labelled examples and a description of where they come from."""
    from lmforge.train import read_csv, read_jsonl, stdlib_docstrings

    if args.data is None:
        return stdlib_docstrings(), "standard-library docstrings"
    path = Path(args.data)
    readers = {".csv": read_csv, ".jsonl": read_jsonl}
    if path.suffix.lower() not in readers:
        raise InputError(f"--data {path}: expected a .csv or .jsonl file of labelled texts (one per row or line).")
    return readers[path.suffix.lower()](path, text_column=args.text_column, label_column=args.label_column), str(path)


def build_classifier(ref: str, labels: list):
    """The sequence-classification model of `ref`'s architecture with its pretrained weights and a new head
    with one output per label (named in config.json's id2label)."""
    from lmforge import AutoModelForSequenceClassification

    names = [str(label) for label in labels]
    return AutoModelForSequenceClassification.from_pretrained(
        ref, num_labels=len(names), id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)})


def tokenize(documents: list, tokenizer, label_to_id: dict, limit: int, truncate: bool, limit_flag: str) -> list[dict]:
    """Token ids per example; an example longer than `limit` is cut with `truncate`, else an error."""
    from lmforge.train import tokenize_documents

    examples = tokenize_documents(documents, tokenizer, label_to_id=label_to_id)
    too_long = [i for i, example in enumerate(examples) if len(example["input_ids"]) > limit]
    if too_long and not truncate:
        first = too_long[0]
        raise InputError(f"{len(too_long)} of {len(examples)} examples are longer than {limit} tokens ({limit_flag}), "
                         f"e.g. {documents[first].source} with {len(examples[first]['input_ids'])}; pass --truncate "
                         "to cut them, or shorten them in the data.")
    cut = tokenize_documents([documents[i] for i in too_long], tokenizer, limit, truncation=True,
                             label_to_id=label_to_id)
    for index, example in zip(too_long, cut):
        examples[index] = example
    return examples


def handle(args: argparse.Namespace) -> int:
    from lmforge import AutoTokenizer
    from lmforge.peft import apply_method, trainable_summary
    from lmforge.quant.checkpoint import check_output_folder
    from lmforge.train import (
        PaddingCollator,
        Trainer,
        TrainingArguments,
        label_vocabulary,
        set_seed,
        train_validation_split,
    )

    check_counts(args)  # mistakes in the arguments fail before anything loads
    options = method_options(args)
    out = check_output_folder(args.out, args.force)
    documents, origin = load_labelled_documents(args)
    label_to_id = label_vocabulary(documents)
    if len(label_to_id) < 2:
        raise InputError(f"{origin}: every example has the label {next(iter(label_to_id))!r}; a classifier needs at "
                         "least 2 classes (check --label-column).")
    train_documents, held_out = train_validation_split(documents, args.validation, args.seed)

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    set_seed(args.seed)  # the new head and the adapters draw their initial weights
    model = build_classifier(args.model, list(label_to_id))
    positions = model.config.context_length
    if args.max_length is not None and not 1 <= args.max_length <= positions:
        raise ValidationError(f"--max-length must be from 1 to the model's {positions} positions, got {args.max_length}.")
    limit = args.max_length or positions
    limit_flag = "--max-length" if args.max_length else "the model's positions"
    train = tokenize(train_documents, tokenizer, label_to_id, limit, args.truncate, limit_flag)
    validation = tokenize(held_out, tokenizer, label_to_id, limit, args.truncate, limit_flag)
    if args.method == "partial" and "freeze_layers" not in options:
        from lmforge.peft.freezing import layer_counts

        options["freeze_layers"] = max(layer_counts(model).values(), default=0) // 2
    if args.method == "adapter":
        options = {"bottleneck": 64, "where": "both", **options}
    apply_method(model, args.method, **options)
    summary = trainable_summary(model)
    described = ", ".join(f"{name}={value}" for name, value in options.items())
    print(f"model       {args.model} -> {type(model).__name__}, {len(label_to_id)} labels: "
          f"{', '.join(map(str, label_to_id))}")
    print(f"data        {origin}: {len(train)} training, {len(validation)} held-out examples")
    print(f"method      {args.method}{f' ({described})' if described else ''}")
    print(f"parameters  {summary}", flush=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.partial-", dir=out.parent) as work:
        work = Path(work)
        learning_rate = args.lr if args.lr is not None else LEARNING_RATES[args.method]
        training_args = TrainingArguments(
            output_dir=work / "training", learning_rate=learning_rate, weight_decay=0.01, warmup_ratio=0.1,
            num_epochs=None if args.max_steps is not None else (3 if args.epochs is None else args.epochs),
            max_steps=args.max_steps,
            per_device_batch_size=args.batch_size, seed=args.seed, logging_steps=10)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        trainer = Trainer(model, training_args, train, PaddingCollator(pad_token_id=pad), eval_dataset=validation,
                          task="sequence-classification")
        trained, cpu = time.perf_counter(), time.process_time()
        state = trainer.train()
        seconds, cpu_seconds = time.perf_counter() - trained, time.process_time() - cpu
        metrics = trainer.evaluate()
        print(f"training    {state.global_step} steps, {state.epoch + 1} epoch(s) in {seconds:.1f} s "
              f"({cpu_seconds:.1f} s of CPU), last loss {state.loss:.4f}")
        print(f"held-out    accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, "
              f"loss {metrics['loss']:.4f} ({len(validation)} examples)")

        record = {"model": args.model, "method": args.method, "options": options, "data": origin,
                  "labels": [str(label) for label in label_to_id], "train_examples": len(train),
                  "validation_examples": len(validation), "learning_rate": learning_rate, "steps": state.global_step,
                  "train_seconds": round(seconds, 3), "train_cpu_seconds": round(cpu_seconds, 3),
                  "total_seconds": round(time.perf_counter() - start, 3),
                  "trainable_parameters": summary.trainable, "total_parameters": summary.total,
                  "metrics": metrics}
        write_folder(out, work, model, tokenizer, record)
    note(f"saved {out}: {', '.join(sorted(path.name for path in out.iterdir()))}")
    return 0


def write_folder(out: Path, work: Path, model, tokenizer, record: dict) -> None:
    """Model, tokenizer, training log and run record, staged in `work` and then moved to `out` in one rename,
    so an interrupted save never leaves half a folder (an existing `out` is replaced only then)."""
    staged = work / "model"
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    if (work / "training" / "log.jsonl").is_file():
        shutil.copy(work / "training" / "log.jsonl", staged / "log.jsonl")
    (staged / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staged.rename(out)
