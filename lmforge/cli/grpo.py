"""`lmforge grpo`: online RL (GRPO) of a chat model against a reward, on its own sampled answers.

--data is a .json or .jsonl file of prompt rows, {"prompt": text or chat messages} or {"messages": [...]};
any other columns go to the reward function. Each step samples --num-generations answers to each of
--batch-size prompts, scores them, and raises the probability of the answers that beat their group's
mean, while a KL term (--beta) keeps the model near the reference (the starting model: LoRA switched
off, or a frozen copy for --method full). The reward is a Python function given as module:function
(--reward; TRL's signature reward(prompts, completions, **columns) -> list of numbers; a module in the
current folder imports as is) or a reward model folder from `lmforge reward-model` (--reward-model).
A seeded held-out part of the rows measures the mean reward of greedy answers before and after. --out
receives what `lmforge sft` writes (an adapter folder, or a model folder for full / --merge) with
grpo.json. Without --data, the prompts are the dates task (dates in words → ISO 8601), rewarded by
lmforge.align.tasks:iso_date_reward (1 for the exact date; a well-formed YYYY-MM-DD earns 0.1
plus 0.3 for each right field).
"""

from __future__ import annotations

import argparse
import os
import sys

from lmforge.cli.common import note
from lmforge.cli.sft import (
    add_alignment_arguments,
    publish,
    save_trained,
    start_run,
    train_measured,
    training_config,
)

LEARNING_RATES = {"full": 1e-6, "lora": 2e-4, "qlora": 2e-4}
DATES_REWARD = "lmforge.align.tasks:iso_date_reward"
# No LoRA dropout by default: RL compares the probabilities answers were sampled with (dropout off)
# to those of the training forward pass, which dropout would make noisy.
RL_LORA_DROPOUT = 0.0
RECORD = "grpo.json"

EXAMPLES = f"""examples:
  lmforge grpo --method lora --max-steps 30 --out dates-grpo
  lmforge grpo --data prompts.jsonl --reward my_rewards:brevity --method lora --num-generations 8 --out brief
  lmforge grpo --data prompts.jsonl --reward-model dates-reward --method qlora --beta 0.1 --out rm-grpo

  # my_rewards.py, in the current folder:
  def brevity(prompts, completions, **columns):
      return [1.0 / (1 + len(text.split())) for text in completions]

(default --reward: {DATES_REWARD}, which reads the rows' "response" column)
"""


def add_rollout_arguments(parser: argparse.ArgumentParser, beta: float) -> argparse._ArgumentGroup:
    """The sampling and KL options GRPO and PPO share; returns the group for more."""
    rollouts = parser.add_argument_group("rollouts")
    rollouts.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                          help="longest sampled answer in tokens (default: 32)")
    rollouts.add_argument("--temperature", type=float, default=1.0, metavar="T",
                          help="sampling temperature of the answers trained on (default: 1.0)")
    rollouts.add_argument("--beta", type=float, default=beta, metavar="B",
                          help=f"weight of the KL pull towards the reference; 0: none (default: {beta})")
    return rollouts


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("grpo", help="online RL (GRPO): sample answers, score them, learn from the "
                                   "better ones", description=__doc__, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_alignment_arguments(parser, ".json or .jsonl prompt rows (default: the dates task's prompts, 200 rows)",
                            LEARNING_RATES, lora_dropout=RL_LORA_DROPOUT)
    rollouts = add_rollout_arguments(parser, beta=0.04)
    rollouts.add_argument("--num-generations", type=int, default=4, metavar="G",
                          help="answers sampled per prompt, compared with each other (default: 4)")
    reward = parser.add_argument_group("reward (one of)").add_mutually_exclusive_group()
    reward.add_argument("--reward", metavar="MODULE:FUNCTION",
                        help=f"a Python reward function (default: {DATES_REWARD})")
    reward.add_argument("--reward-model", metavar="DIR", help="a reward model folder from `lmforge reward-model`")
    parser.set_defaults(handler=handle)


def load_prompts(args: argparse.Namespace) -> tuple[list[dict], str]:
    """The prompt rows, checked before the split shuffles them, so that an error names the file's row."""
    from lmforge.align import read_rows
    from lmforge.align.rollout import row_prompt
    from lmforge.align.tasks import date_prompts

    if args.data is None:
        return date_prompts(200, seed=args.seed), "the dates task prompts (generated)"
    rows = read_rows(args.data)
    for number, row in enumerate(rows, 1):
        row_prompt(row, number)
    return rows, args.data


def load_reward(args: argparse.Namespace):
    """The reward source the flags name (before the policy loads, so that a bad one fails fast)."""
    from lmforge.align import RewardFunction, RewardModel

    if args.reward_model is not None:
        return RewardModel.from_pretrained(args.reward_model), args.reward_model
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, "")  # a reward module in the current folder imports, as under `python -m`
    spec = args.reward or DATES_REWARD
    return RewardFunction.from_string(spec), spec


def handle(args: argparse.Namespace) -> int:
    from lmforge.align import GRPOConfig, GRPOTrainer, RewardFunction

    reward, reward_name = load_reward(args)
    rows, origin = load_prompts(args)
    if isinstance(reward, RewardFunction):
        reward.check_columns(rows)  # here, so that an error names the file's row
    run = start_run(args, rows, origin, unit="prompts")
    with run.workspace() as work:
        config = training_config(GRPOConfig, args, work, LEARNING_RATES, num_generations=args.num_generations,
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, beta=args.beta)
        trainer = GRPOTrainer(run.model, config, run.train, run.tokenizer, reward, eval_dataset=run.held_out)
        if trainer.dropped:
            note(f"{trainer.dropped} prompts dropped as longer than the maximum length")
        before, state, seconds, after = train_measured(trainer)
        print(f"held-out    mean reward {before['reward']:.3f} -> {after['reward']:.3f} (greedy answers, "
              f"{len(run.held_out)} prompts)")
        staged = save_trained(run.model, run.tokenizer, args, work / "result")
        record = run.record(args, config, state, seconds, reward=reward_name, num_generations=args.num_generations,
                            beta=args.beta, prompts_dropped=trainer.dropped, held_out_before=before,
                            held_out_after=after)
        publish(staged, run.out, record, RECORD)
    return 0
