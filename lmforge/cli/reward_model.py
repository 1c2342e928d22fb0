"""`lmforge reward-model`: train a model that scores answers, from (prompt, chosen, rejected) examples.

--data is a .json or .jsonl file of rows {"prompt": text or chat messages, "chosen": text,
"rejected": text}, as for `lmforge dpo`. The model's next-token head gives way to a new linear
`score` head with one output, read at the last token; the Bradley–Terry loss
−log σ(r_chosen − r_rejected) teaches it to score the chosen answer higher. A seeded held-out
part of the rows measures pairwise accuracy (how often the chosen answer scores higher) before
and after. --out receives a model folder (full, or lora/qlora with --merge; load it with
AutoModelForSequenceClassification) or a PEFT adapter folder holding the LoRA matrices and the
trained head, with reward.json. With qlora the backbone is frozen in NF4 and the new head stays in
float32, trained fully beside the adapters. Without --data, the rows prefer the bare ISO date to chatty
answers in other formats (the dates task).
"""

from __future__ import annotations

import argparse

from lmforge.cli.common import note
from lmforge.cli.dpo import load_preferences
from lmforge.cli.sft import (
    add_alignment_arguments,
    publish,
    save_trained,
    start_run,
    train_measured,
    training_config,
)

LEARNING_RATES = {"full": 1e-5, "lora": 1e-4, "qlora": 1e-4}
RECORD = "reward.json"

EXAMPLES = """examples:
  lmforge reward-model --method lora --max-steps 40 --out dates-reward
  lmforge reward-model --data preferences.jsonl --method full --epochs 1 --out reward-model
  lmforge reward-model --method qlora --lora-r 16 --max-steps 40 --out dates-reward-qlora
  lmforge reward-model path/to/sft-model --data prefs.json --method lora --merge --out scorer
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("reward-model", help="train a reward model (a scalar score) on chosen/rejected "
                                   "answer pairs", description=__doc__, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_alignment_arguments(parser, ".json or .jsonl rows with prompt, chosen, rejected (default: the dates "
                                    "format preference, 200 rows)", LEARNING_RATES)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from lmforge.align import RewardConfig, RewardTrainer

    run = start_run(args, *load_preferences(args), unit="pairs", task="sequence-classification")
    train_rows, held_out, tokenizer, model = run.train, run.held_out, run.tokenizer, run.model
    with run.workspace() as work:
        config = training_config(RewardConfig, args, work, LEARNING_RATES)
        trainer = RewardTrainer(model, config, train_rows, tokenizer, eval_dataset=held_out)
        if trainer.dropped:
            note(f"{trainer.dropped} pairs dropped as longer than the maximum length")
        before, state, seconds, after = train_measured(trainer)
        print(f"held-out    pairwise accuracy {before['pairwise_accuracy']:.3f} -> {after['pairwise_accuracy']:.3f}, "
              f"reward margin {before['reward_margin']:.3f} -> {after['reward_margin']:.3f} ({len(held_out)} pairs)")
        staged = save_trained(model, tokenizer, args, work / "result")
        record = run.record(args, config, state, seconds, pairs_dropped=trainer.dropped, held_out_before=before,
                            held_out_after=after)
        publish(staged, run.out, record, RECORD)
    return 0
