"""What int8, int4 and NF4 weights cost a model that was trained in float32: held-out perplexity deltas.

Models downloaded from a hub were often trained or stored in bf16 or already quantized, which hides
what quantization itself loses. A model lmforge pretrained from scratch on this CPU is float32 all
the way. This script loads such a run folder (`lmforge pretrain --config configs/pretrain-clm.yaml
--out runs/clm`), rebuilds its validation blocks exactly (same run config, the run's own tokenizer),
and scores the float32 model and its int8 / int4 / NF4 quantizations (every linear layer but the
tied head) on them: per-token loss, perplexity, the change against float32, and weight bytes.
Writes the table to docs/benchmarks.md (section "pretrain-quant").
Usage: python -m benchmarks.pretrain_quant --run runs/clm
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from benchmarks.report import machine_line, markdown_table, write_section

METHODS = ("float32", "int8", "int4", "nf4")


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer (packed codes and scales included)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def trained_steps(run: Path) -> str:
    """", N training steps" from the run's last checkpoint (a run may stop early at its time budget), or nothing."""
    steps = [int(folder.name.rpartition("-")[2]) for folder in (run / "checkpoints").glob("checkpoint-*")]
    return f", {max(steps)} training steps" if steps else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a folder written by `lmforge pretrain --objective clm`")
    args = parser.parse_args()
    from lmforge import AutoModelForCausalLM, AutoTokenizer
    from lmforge.quant import quantize_model
    from lmforge.train import PaddingCollator, Trainer
    from lmforge.train.pretrain import prepare_data
    from lmforge.train.run_config import load_run_config

    run = Path(args.run)
    config = load_run_config(run / "run.yaml", [], objective="clm")
    tokenizer = AutoTokenizer.from_pretrained(run)
    data = prepare_data(config, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(run)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for method in METHODS:
            model = copy.deepcopy(base)
            if method != "float32":
                quantize_model(model, method)
            trainer = Trainer(model.eval(), config.training.arguments(Path(work) / method), data.train[:1],
                              PaddingCollator(pad_token_id=tokenizer.pad_token_id, causal_lm_labels=True),
                              eval_dataset=data.validation, task="causal-lm")
            clock = time.perf_counter()
            scores = trainer.evaluate()
            results[method] = {**scores, "bytes": weight_bytes(model), "seconds": time.perf_counter() - clock}
            print(method, json.dumps(results[method]), flush=True)
    reference = results["float32"]
    rows = [[method, f"{r['loss']:.4f}", f"{r['perplexity']:.2f}", f"{r['perplexity'] - reference['perplexity']:+.2f}",
             f"{100 * (r['perplexity'] / reference['perplexity'] - 1):+.1f}%", f"{r['bytes'] / 2**20:.1f}"]
            for method, r in results.items()]
    table = markdown_table(["weights", "validation loss", "perplexity", "Δ perplexity", "Δ %", "weights MiB"], rows)
    model = config.model
    steps = trained_steps(run)
    write_section("pretrain-quant", f"""
## Quantizing a model trained in float32 (`benchmarks/pretrain_quant.py`)

{machine_line()}. The decoder `lmforge pretrain` trained from scratch on the standard library ({model.layers}
layers, width {model.hidden_size}, {base.num_parameters() / 1e6:.2f}M parameters, float32 throughout{steps}), scored on its
own {len(data.validation)} validation blocks of {config.data.block_size} tokens; every linear layer but the tied
embedding/head quantized (int8 per channel, int4 groups, NF4 blocks).

{table}
""")


if __name__ == "__main__":
    main()
