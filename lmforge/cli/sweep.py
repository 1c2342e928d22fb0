"""`lmforge sweep`: search pretraining hyperparameters with Optuna.

Each trial is a short pretraining run (the `lmforge pretrain` code path) on one tokenizer
and one set of token blocks, prepared once. Optuna's TPE sampler picks the learning rate
(log-uniform around the configured one), warmup ratio, batch size, layers and hidden size;
a median pruner stops trials whose validation loss falls behind. DIR gets sweep.csv,
sweep.md (best first), sweep.png (loss against learning rate) and best.yaml, the run
config of the best trial, ready for `lmforge pretrain --config DIR/best.yaml`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli.common import note
from lmforge.cli.pretrain import add_run_arguments

EXAMPLES = """examples:
  lmforge sweep --objective clm --config configs/pretrain-clm.yaml --trials 20 --max-steps-per-trial 200 \\
      data.max_characters=2000000 --out runs/sweep
  lmforge sweep --objective clm --trials 8 --max-steps-per-trial 100 model.layers=2 --seed 1 --out runs/quick
  lmforge pretrain --config runs/sweep/best.yaml --out runs/best
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help="search pretraining hyperparameters (Optuna, with pruning)",
                                   description=__doc__, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--trials", type=int, default=20, metavar="N", help="settings to try (default: 20)")
    parser.add_argument("--max-steps-per-trial", type=int, default=200, metavar="S",
                        help="optimizer steps of each trial (default: 200)")
    parser.add_argument("--seed", type=int, metavar="N",
                        help="seeds the sampler: the same seed proposes the same trials (default: training.seed)")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from lmforge.train.run_config import load_run_config
    from lmforge.train.sweep import (
        BEST_CONFIG,
        PLOT,
        RESULTS_CSV,
        RESULTS_MD,
        run_sweep,
    )

    out = Path(args.out)
    config = load_run_config(args.config, args.overrides, objective=args.objective)
    results = run_sweep(config, out, args.trials, args.max_steps_per_trial, seed=args.seed, log=note)
    counts = {state: sum(r.state == state for r in results) for state in ("COMPLETE", "PRUNED", "FAIL")}
    print(f"{len(results)} trials: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed")
    print((out / RESULTS_MD).read_text().rstrip())
    print(f"results  {out / RESULTS_CSV}, {out / PLOT}")
    if counts["COMPLETE"]:
        print(f"best     {out / BEST_CONFIG} (train it: lmforge pretrain --config {out / BEST_CONFIG} --out DIR)")
    return 0
