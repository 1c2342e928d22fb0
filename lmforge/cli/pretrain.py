"""`lmforge pretrain`: train a small language model from scratch on a corpus.

By default the corpus is the Python standard library's own source code, found in every
Python installation. The run holds out validation files, learns a byte-level BPE tokenizer
on the rest, packs the token stream into blocks, and trains a Llama-style decoder
(--objective clm, next-token prediction) or a BERT-style encoder (--objective mlm, masked
tokens), evaluating on the held-out files. DIR ends up a model folder that every command
loads (`lmforge generate --model DIR`), with checkpoints, log.jsonl and loss_curve.png in
DIR/checkpoints. Settings come from a YAML run config and key=value overrides.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli.common import note
from lmforge.errors import InputError

EXAMPLES = """examples:
  lmforge pretrain --objective clm --config configs/pretrain-clm.yaml --out runs/clm
  lmforge pretrain --objective clm training.max_steps=200 model.layers=2 data.max_files=300 --out runs/quick
  lmforge pretrain --objective mlm --config configs/pretrain-mlm.yaml training.max_minutes=5 --out runs/mlm
  lmforge pretrain --out runs/clm --resume training.max_steps=2000      # continue a stopped run
  lmforge generate "def " --model runs/clm --raw --temperature 0.8

keys (section.field): model.layers, model.hidden_size, model.heads, model.intermediate_size,
  model.context_length, tokenizer.vocab_size, data.corpus, data.pattern, data.validation,
  data.block_size, data.max_files, data.max_characters, training.learning_rate,
  training.max_steps, training.per_device_batch_size, training.max_minutes, ... (every field of
  TrainingArguments; see docs/training.md)
"""

SAMPLE_PROMPT = "def "


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments `pretrain` and `sweep` share: objective, run config, overrides and output folder."""
    parser.add_argument("--objective", choices=("clm", "mlm"),
                        help="clm: a decoder learns to predict the next token; mlm: an encoder learns to fill in "
                             "masked tokens (default: the config's objective, else clm)")
    parser.add_argument("--config", metavar="RUN.yaml", help="a YAML run config (e.g. configs/pretrain-clm.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="change one config value, e.g. training.learning_rate=3e-4 model.layers=4")
    parser.add_argument("--out", required=True, metavar="DIR", help="the run's output folder")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("pretrain", help="train a small language model from scratch",
                                   description=__doc__, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in DIR from its latest checkpoint, with DIR/run.yaml (plus any "
                             "overrides) as its config")
    parser.add_argument("--max-minutes", type=float, metavar="M",
                        help="stop after M minutes of training (same as training.max_minutes=M)")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from lmforge.train.pretrain import RUN_CONFIG, pretrain
    from lmforge.train.run_config import load_run_config

    out = Path(args.out)
    overrides = list(args.overrides)
    if args.max_minutes is not None:
        overrides.append(f"training.max_minutes={args.max_minutes}")
    if args.resume:
        if args.config is not None:
            raise InputError(f"--resume continues with {out / RUN_CONFIG}, the config the run was started with; "
                             "drop --config (give changes as key=value overrides).")
        config_path = out / RUN_CONFIG
        if not config_path.is_file():
            raise InputError(f"{out} holds no run to resume ({config_path} not found); start the run without "
                             "--resume.")
    else:
        config_path = args.config
    config = load_run_config(config_path, overrides, objective=args.objective)
    result = pretrain(config, out, resume=args.resume, log=note)

    state, metrics = result.state, result.metrics
    print(f"trained {state.global_step} steps; validation loss {metrics['loss']:.4f}, "
          f"perplexity {metrics['perplexity']:.2f}")
    print(f"model    {out} (load with from_pretrained, or `lmforge generate --model {out}`)")
    print(f"logs     {out / 'checkpoints'} (log.jsonl, loss_curve.png, checkpoint folders)")
    if config.objective == "clm":
        from lmforge import SamplingParams

        params = SamplingParams(max_tokens=64, temperature=0.8, top_k=50, seed=config.training.seed)
        sample = result.model.generate(result.tokenizer, SAMPLE_PROMPT, params)[0].outputs[0].text
        print(f"sample (temperature 0.8):\n{SAMPLE_PROMPT + sample}")
    return 0
