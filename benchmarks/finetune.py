"""Classic fine-tuning methods side by side: all-MiniLM-L6-v2 learns the stdlib docstring demo four ways.

Each method is one `lmforge finetune` run in its own process (so its peak RSS is its own) with the
same data, split, seed, epochs, batch size and length limit, at the CLI's default learning rate for
the method. The peer is HF transformers' BertForSequenceClassification fully fine-tuned on the same
token ids with the same recipe (AdamW decaying matrices only, 10% warmup then linear decay,
clipping at 1.0) in a plain PyTorch loop. Reported: held-out accuracy and macro F1, trainable
parameters, training CPU and wall time, the whole process's wall time and peak RSS, and the
machine's load meanwhile.
Writes the table to docs/benchmarks.md (section "finetune").
Usage: python -m benchmarks.finetune [--repeats 3] [--epochs 2] [--max-length 32] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.report import machine_line, markdown_table, write_section

MODEL = "all-minilm-l6-v2"
METHODS = ("full", "frozen", "partial", "adapter")
HF = "HF transformers full (plain loop)"


def run_measured(command: list[str]) -> tuple[float, int, float, str]:
    """Run `command`; return its wall time, its own peak RSS in bytes (wait4's rusage), the mean 1-minute load
    average while it ran (other jobs slow every time on a shared machine) and its stdout."""
    loads, done = [], threading.Event()

    def sample_load() -> None:
        while not done.wait(5.0):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample_load, daemon=True)
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout:
        process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True)
        sampler.start()
        stderr = process.stderr.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        done.set()
        if process.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-2000:]}")
        stdout.seek(0)
        load = sum(loads) / len(loads) if loads else os.getloadavg()[0]
        return seconds, usage.ru_maxrss * 1024, load, stdout.read()


def measure_lmforge(method: str, args, work: Path) -> dict:
    out = work / method
    seconds, peak, load, _ = run_measured([
        sys.executable, "-m", "lmforge.cli", "finetune", MODEL, "--method", method, "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--truncate",
        "--seed", str(args.seed), "--out", str(out)])
    record = json.loads((out / "finetune.json").read_text())
    shutil.rmtree(out)  # the next repeat writes the same folder
    return {"accuracy": record["metrics"]["accuracy"], "macro_f1": record["metrics"]["macro_f1"],
            "trainable": record["trainable_parameters"], "total": record["total_parameters"],
            "learning_rate": record["learning_rate"], "steps": record["steps"], "train_seconds": record["train_seconds"],
            "train_cpu_seconds": record["train_cpu_seconds"], "wall_seconds": seconds, "peak_rss": peak, "load": load}


def train_hf(args) -> dict:
    """The peer, in this process: HF's model, the same token ids and recipe, a plain loop."""
    import torch
    import torch.nn.functional as F
    import transformers

    from lmforge import AutoTokenizer
    from lmforge.cli.finetune import LEARNING_RATES, tokenize
    from lmforge.sources import resolve
    from lmforge.train import (
        PaddingCollator,
        build_optimizer,
        build_scheduler,
        classification_metrics,
        label_vocabulary,
        set_seed,
        stdlib_docstrings,
        train_validation_split,
    )

    documents = stdlib_docstrings()
    labels = label_vocabulary(documents)
    train_documents, held_out = train_validation_split(documents, 0.2, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    train, validation = (tokenize(part, tokenizer, labels, args.max_length, True, "--max-length")
                         for part in (train_documents, held_out))
    set_seed(args.seed)
    transformers.logging.set_verbosity_error()  # the new classifier's "newly initialized" notice
    model = transformers.BertForSequenceClassification.from_pretrained(resolve(MODEL), num_labels=len(labels))
    learning_rate = LEARNING_RATES["full"]
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    optimizer = build_optimizer(model, learning_rate, weight_decay=0.01)
    scheduler = build_scheduler(optimizer, "linear", math.ceil(0.1 * total), total)
    collate = PaddingCollator(pad_token_id=tokenizer.pad_token_id)
    start, cpu = time.perf_counter(), time.process_time()
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        for step in range(steps_per_epoch):
            batch = collate([train[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]])
            labels_batch = batch.pop("labels")
            loss = F.cross_entropy(model(**batch).logits, labels_batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    model.eval()
    predictions, targets = [], []
    with torch.no_grad():
        for first in range(0, len(validation), args.batch_size):
            batch = collate(validation[first:first + args.batch_size])
            targets.append(batch.pop("labels"))
            predictions.append(model(**batch).logits.argmax(-1))
    metrics = classification_metrics(torch.cat(predictions), torch.cat(targets))
    count = sum(p.numel() for p in model.parameters())
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "trainable": count, "total": count,
            "learning_rate": learning_rate, "steps": total, "train_seconds": seconds, "train_cpu_seconds": cpu_seconds}


def measure_hf(args) -> dict:
    seconds, peak, load, stdout = run_measured([sys.executable, "-m", "benchmarks.finetune", *sys.argv[1:],
                                                "--only-hf"])
    return {**json.loads(stdout.strip().splitlines()[-1]), "wall_seconds": seconds, "peak_rss": peak, "load": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32, help="examples are truncated to N tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each system; the table shows medians")
    parser.add_argument("--only-hf", action="store_true", help=argparse.SUPPRESS)  # internal: the peer, print JSON
    args = parser.parse_args()
    if args.only_hf:
        print(json.dumps(train_hf(args)))
        return
    runs: dict[str, list[dict]] = {f"lmforge {method}": [] for method in METHODS} | {HF: []}
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(args.repeats):  # interleaved, so a slow spell of the machine hits every system
            for system, measured in runs.items():
                print(f"measuring {system} ({repeat + 1}/{args.repeats}) ...", flush=True)
                method = system.removeprefix("lmforge ")
                measured.append(measure_hf(args) if system == HF else measure_lmforge(method, args, Path(work)))
                print(f"  {json.dumps(measured[-1])}", flush=True)
    write_report({system: median_run(measured) for system, measured in runs.items()}, args)


def median_run(measured: list[dict]) -> dict:
    """Each number's median over the repeats (accuracy is the same every time: the runs are seeded)."""
    return {key: statistics.median(run[key] for run in measured) for key in measured[0]}


def write_report(results: dict[str, dict], args) -> None:
    rows = [[system, f"{r['trainable']:,}", f"{100 * r['trainable'] / r['total']:.2f}%", f"{r['learning_rate']:g}",
             f"{r['accuracy']:.3f}", f"{r['macro_f1']:.3f}", f"{r['train_cpu_seconds']:.0f}", f"{r['train_seconds']:.0f}",
             f"{r['wall_seconds']:.0f}", f"{r['peak_rss'] / 1e6:.0f}", f"{r['load']:.1f}"] for system, r in results.items()]
    steps = next(iter(results.values()))["steps"]
    body = (f"## Fine-tuning methods: all-MiniLM-L6-v2 on the stdlib docstring demo (`benchmarks/finetune.py`)\n\n"
            f"Machine: {machine_line()}. Task: the first paragraph of 600 standard-library docstrings, 100 from "
            f"each of 6 packages, labelled by package; 480 train, 120 held out (seed {args.seed}). Every run: "
            f"{args.epochs} epochs ({steps} steps of {args.batch_size}), examples truncated to {args.max_length} "
            f"tokens, AdamW (weight decay 0.01 on matrices), 10% warmup then linear decay, the learning rate in "
            f"the table (the CLI's default per method). partial freezes the embeddings and layers 0-2 of 6; "
            f"adapter puts a 64-wide bottleneck after each attention output and feed-forward. Train CPU s: the "
            f"CPU time of the training loop, both threads together (less sensitive to other jobs than wall "
            f"time); train s: its wall time; wall s and peak RSS: the whole process (loading, tokenizing, "
            f"evaluating, saving included), each run in its own process. Load: the mean 1-minute load average "
            f"during the run; the run itself adds up to 2 (the average lags behind short runs), more means other "
            f"jobs shared the 2 cores. Medians of {args.repeats} interleaved runs per system.\n\n"
            + markdown_table(["system", "trainable params", "trainable", "lr", "held-out accuracy", "macro F1",
                              "train CPU s", "train s", "wall s", "peak RSS MB", "load"], rows))
    write_section("finetune", body)
    print(body)


if __name__ == "__main__":
    main()
