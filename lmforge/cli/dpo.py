"""`lmforge dpo`: preference tuning (DPO) of a chat model on (prompt, chosen, rejected) examples.

--data is a .json or .jsonl file of rows {"prompt": text or chat messages, "chosen": text,
"rejected": text}. The model learns to give the chosen answer a higher probability than the
rejected one, relative to a reference: the starting model (LoRA switched off, or a frozen
copy for --method full). --beta sets how far it may move (larger: closer to the reference).
A seeded held-out part of the rows measures preference accuracy and reward margin before and
after. --out receives what `lmforge sft` writes (an adapter folder, or a model folder for
full / --merge) with dpo.json. Without --data, the rows prefer the bare ISO date to chatty
answers in other formats (the dates task).
"""

from __future__ import annotations

import argparse

from lmforge.cli.common import note
from lmforge.cli.sft import (
    add_alignment_arguments,
    publish,
    save_trained,
    start_run,
    train_measured,
    training_config,
)

LEARNING_RATES = {"full": 5e-6, "lora": 5e-5, "qlora": 5e-5}
RECORD = "dpo.json"

EXAMPLES = """examples:
  lmforge dpo --method lora --max-steps 40 --out dates-dpo
  lmforge dpo --data preferences.jsonl --method qlora --beta 0.2 --epochs 1 --out prefs-qlora
  lmforge dpo path/to/sft-model --data prefs.json --method full --loss ipo --out aligned
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("dpo", help="preference tuning (DPO/IPO) on chosen/rejected answer pairs",
                                   description=__doc__, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_alignment_arguments(parser, ".json or .jsonl rows with prompt, chosen, rejected (default: the dates "
                                    "format preference, 200 rows)", LEARNING_RATES)
    objective = parser.add_argument_group("objective")
    objective.add_argument("--beta", type=float, default=0.1, metavar="B",
                           help="strength of the pull towards the reference (default: 0.1)")
    objective.add_argument("--loss", choices=("sigmoid", "ipo"), default="sigmoid",
                           help="sigmoid: DPO; ipo: squared loss that does not push margins to infinity")
    parser.set_defaults(handler=handle)


def load_preferences(args: argparse.Namespace) -> tuple[list[dict], str]:
    from lmforge.align import read_rows
    from lmforge.align.tasks import date_preferences

    if args.data is None:
        return date_preferences(200, seed=args.seed), "the dates format preference (generated)"
    return read_rows(args.data), args.data


def handle(args: argparse.Namespace) -> int:
    from lmforge.align import DPOConfig, DPOTrainer

    run = start_run(args, *load_preferences(args), unit="pairs")
    train_rows, held_out, tokenizer, model = run.train, run.held_out, run.tokenizer, run.model
    with run.workspace() as work:
        config = training_config(DPOConfig, args, work, LEARNING_RATES, beta=args.beta, loss_type=args.loss)
        trainer = DPOTrainer(model, config, train_rows, tokenizer, eval_dataset=held_out)
        if trainer.dropped:
            note(f"{trainer.dropped} pairs dropped as longer than the maximum length")
        before, state, seconds, after = train_measured(trainer)
        print(f"held-out    preference accuracy {before['preference_accuracy']:.3f} -> "
              f"{after['preference_accuracy']:.3f}, reward margin {before['reward_margin']:.3f} -> "
              f"{after['reward_margin']:.3f} ({len(held_out)} pairs)")
        staged = save_trained(model, tokenizer, args, work / "result")
        record = run.record(args, config, state, seconds, beta=args.beta, loss=args.loss,
                            pairs_dropped=trainer.dropped, held_out_before=before, held_out_after=after)
        publish(staged, run.out, record, RECORD)
    return 0
