"""`lmforge ppo`: RLHF with PPO — a chat model learns to please a reward model, on its own sampled answers.

--reward-model is a folder from `lmforge reward-model` (a model folder, or an adapter folder with its
score head). --data is a .json or .jsonl file of prompt rows, {"prompt": text or chat messages} or
{"messages": [...]}. Each step samples one answer per prompt; its reward is the reward model's score at
the last token minus a per-token KL penalty (--beta) that keeps the model near the reference (the
starting model: LoRA switched off, or a frozen copy for --method full). A value head on the model's
final hidden state estimates returns; advantages come from GAE (--gamma, --lam), and --ppo-epochs passes
over each rollout update the model with PPO's clipped losses. A seeded held-out part of the rows measures
the mean reward-model score of greedy answers before and after. --out receives what `lmforge sft` writes
(an adapter folder, or a model folder for full / --merge; the value head is not kept) with ppo.json.
Without --data, the prompts are the dates task's (dates in words → ISO 8601).
"""

from __future__ import annotations

import argparse

from lmforge.cli.common import note
from lmforge.cli.grpo import RL_LORA_DROPOUT, add_rollout_arguments, load_prompts
from lmforge.cli.sft import (
    add_alignment_arguments,
    publish,
    save_trained,
    start_run,
    train_measured,
    training_config,
)

LEARNING_RATES = {"full": 1e-6, "lora": 2e-4, "qlora": 2e-4}
RECORD = "ppo.json"

EXAMPLES = """examples:
  lmforge reward-model --method lora --max-steps 40 --out dates-reward
  lmforge ppo --reward-model dates-reward --method lora --max-steps 30 --out dates-ppo
  lmforge ppo --data prompts.jsonl --reward-model my-reward --method qlora --beta 0.1 --ppo-epochs 2 --out rlhf
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("ppo", help="RLHF with PPO against a reward model (value head, GAE, clipped "
                                   "losses)", description=__doc__, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_alignment_arguments(parser, ".json or .jsonl prompt rows (default: the dates task's prompts, 200 rows)",
                            LEARNING_RATES, lora_dropout=RL_LORA_DROPOUT)
    rollouts = add_rollout_arguments(parser, beta=0.05)
    rollouts.add_argument("--ppo-epochs", type=int, default=4, metavar="N",
                          help="passes over each rollout, one update each (default: 4)")
    rollouts.add_argument("--gamma", type=float, default=1.0, metavar="X", help="discount (default: 1.0)")
    rollouts.add_argument("--lam", type=float, default=0.95, metavar="X", help="GAE's lambda (default: 0.95)")
    parser.add_argument("--reward-model", required=True, metavar="DIR",
                        help="the reward model folder (from `lmforge reward-model`)")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from lmforge.align import PPOConfig, PPOTrainer, RewardModel

    reward = RewardModel.from_pretrained(args.reward_model)  # before the policy loads: a bad folder fails fast
    run = start_run(args, *load_prompts(args), unit="prompts")
    with run.workspace() as work:
        config = training_config(PPOConfig, args, work, LEARNING_RATES, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, beta=args.beta, ppo_epochs=args.ppo_epochs,
                                 gamma=args.gamma, lam=args.lam)
        trainer = PPOTrainer(run.model, config, run.train, run.tokenizer, reward, eval_dataset=run.held_out)
        if trainer.dropped:
            note(f"{trainer.dropped} prompts dropped as longer than the maximum length")
        before, state, seconds, after = train_measured(trainer)
        print(f"held-out    mean reward-model score {before['reward']:.3f} -> {after['reward']:.3f} (greedy "
              f"answers, {len(run.held_out)} prompts)")
        staged = save_trained(run.model, run.tokenizer, args, work / "result")
        record = run.record(args, config, state, seconds, reward_model=args.reward_model, beta=args.beta,
                            ppo_epochs=args.ppo_epochs, prompts_dropped=trainer.dropped, held_out_before=before,
                            held_out_after=after)
        publish(staged, run.out, record, RECORD)
    return 0
