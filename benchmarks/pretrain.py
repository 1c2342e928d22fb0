"""Why transformers replaced LSTMs, measured: both trained from scratch on the same code corpus.

The data side is `lmforge pretrain`'s own (`prepare_data`): the Python standard library's source
files, 2% held out, a byte-level BPE tokenizer trained on the rest, 256-token blocks. Then:
1. the Llama-style decoder of the run config (default configs/pretrain-clm.yaml) trains with the
   lmforge Trainer for --minutes of wall time (or the config's max_steps, whichever ends first);
2. an LSTM language model (`torch.nn.LSTM`, tied input/output embedding) of similar parameter
   count trains with the same Trainer, optimizer settings and schedule on the same blocks for the
   same number of tokens.
Both are scored on the same validation blocks. A token budget (not a time budget) keeps the
comparison fair when other work shares the machine; the wall time of each is reported too.
Writes the table to docs/benchmarks.md (section "pretrain-lstm").
Usage: python -m benchmarks.pretrain [--minutes 15] [key=value run-config overrides ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from benchmarks.report import machine_line, markdown_table, write_section
from lmforge.models.base import ModelOutput
from lmforge.train import PaddingCollator, Trainer, TrainerCallback
from lmforge.train.callbacks import TimeBudget
from lmforge.train.pretrain import build_model, build_trainer, prepare_data
from lmforge.train.run_config import load_run_config

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pretrain-clm.yaml"


class LSTMLanguageModel(nn.Module):
    """Embedding → stacked LSTM → dropout → the embedding again as output layer (tied weights).

    The recurrent state carries everything the model knows about the prefix through one vector
    per layer, step after step; a transformer instead attends to every earlier position directly.
    """

    def __init__(self, vocab_size: int, width: int, layers: int, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.lstm = nn.LSTM(width, width, num_layers=layers, batch_first=True, dropout=dropout)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ModelOutput:
        hidden, _ = self.lstm(self.embed(input_ids))  # blocks are packed: no padding to mask
        return ModelOutput(logits=self.head(self.dropout(hidden)))

    def save_pretrained(self, folder: str | Path, state: dict | None = None) -> None:
        """The Trainer's checkpoints call this: the weights as safetensors (the tied head once)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in (state or self.state_dict()).items() if k != "head.weight"}
        save_file(state, folder / "model.safetensors")


class StopAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer: Trainer) -> None:
        trainer.state.should_stop = trainer.state.global_step >= self.step


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lstm_width_for(target: int, vocab_size: int, layers: int) -> int:
    """The LSTM width whose parameter count is closest to `target` (widths in steps of 16)."""
    count = lambda w: vocab_size * w + layers * 4 * (2 * w * w + 2 * w)
    return min(range(64, 2049, 16), key=lambda w: abs(count(w) - target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG), help="run config of the transformer (and the data)")
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget of the transformer")
    parser.add_argument("--lstm-layers", type=int, default=2, help="stacked LSTM layers")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides")
    args = parser.parse_args()
    config = load_run_config(args.config, args.overrides, objective="clm")
    started = time.perf_counter()
    data = prepare_data(config, progress=True)
    print(f"data: {data.describe()} in {time.perf_counter() - started:.0f} s", flush=True)

    results = {}
    with tempfile.TemporaryDirectory() as work:
        transformer = build_model(config, data.tokenizer)
        trainer = build_trainer(config, data, transformer, Path(work) / "transformer",
                                callbacks=[TimeBudget(args.minutes)])
        clock = time.perf_counter()
        state = trainer.train()
        steps = state.global_step
        results["transformer"] = {"parameters": parameters(transformer), "steps": steps,
                                  "seconds": time.perf_counter() - clock, **trainer.evaluate()}
        print(json.dumps(results["transformer"]), flush=True)

        torch.manual_seed(config.training.seed)
        width = lstm_width_for(parameters(transformer), data.tokenizer.vocab_size, args.lstm_layers)
        lstm = LSTMLanguageModel(data.tokenizer.vocab_size, width, args.lstm_layers)
        # the same schedule as the transformer's (planned for the config's steps), stopped at the same step
        lstm_trainer = Trainer(lstm, config.training.arguments(Path(work) / "lstm"), data.train,
                               PaddingCollator(pad_token_id=data.tokenizer.pad_token_id, causal_lm_labels=True),
                               eval_dataset=data.validation, task="causal-lm", callbacks=[StopAtStep(steps)])
        clock = time.perf_counter()
        lstm_trainer.train()
        results[f"LSTM ({args.lstm_layers} layers, width {width})"] = {
            "parameters": parameters(lstm), "steps": steps, "seconds": time.perf_counter() - clock,
            **lstm_trainer.evaluate()}
        print(json.dumps(results), flush=True)

    tokens = steps * config.training.per_device_batch_size * config.data.block_size
    rows = [[name, f"{r['parameters'] / 1e6:.2f}M", r["steps"], f"{r['seconds'] / 60:.1f}", f"{r['loss']:.3f}",
             f"{r['perplexity']:.1f}"] for name, r in results.items()]
    table = markdown_table(["model", "parameters", "steps", "train minutes", "validation loss",
                            "validation perplexity"], rows)
    model = config.model
    write_section("pretrain-lstm", f"""
## Transformer vs LSTM language model from scratch (`benchmarks/pretrain.py`)

{machine_line()}. Corpus: the Python standard library's source files ({data.describe()}), the same
tokenizer, blocks, AdamW settings and schedule for both. The transformer ({model.layers} layers, width
{model.hidden_size}, {model.heads} heads, context {model.context_length}) trained for {args.minutes:g} minutes
of wall time ({steps} steps, {tokens:,} tokens); the LSTM for the same {steps} steps. Loss is per token
on the held-out files.

{table}
""")


if __name__ == "__main__":
    main()
