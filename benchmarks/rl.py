"""Online RL on SmolLM2-135M-Instruct with LoRA: GRPO against a programmatic reward, PPO against a reward model.

The task is lmforge.align.tasks' dates (a date in words → ISO 8601). Both methods follow the usual pipeline,
SFT then RL: the policy starts from --warm-start steps of LoRA SFT on other dates, merged into the weights
(that model is "before" and the KL reference). Without it the instruct model's sampled answers almost never
have the required shape, so every reward is 0 and there is nothing to compare. Held-out prompts are answered
greedily, and sampled 4 times each as in training, before and after. Each method runs in its own process
(its peak RSS is its own) on this CPU:
- grpo: rewarded by iso_date_reward (1 for the exact date; a well-formed YYYY-MM-DD of another date earns
  0.1 + 0.3 per right field; 0 otherwise), --generations completions per prompt, KL β 0.04 to the
  reference (LoRA switched off).
- ppo: first a LoRA reward model trained with RewardTrainer on dates preference pairs where the chosen
  answer is the right ISO date and the rejected one is either chatty or a near miss (a valid date one
  field away, or the right date malformed), so the scorer must read the date and check its shape, not
  only the answer's look; then PPO against it (value
  head, GAE, KL β 0.05). Reported are its held-out pairwise accuracy (all pairs, and near misses alone),
  and the mean reward-model score of the greedy answers beside their dates reward.
Writes the table to docs/benchmarks.md (section "rl"); --quick runs tiny settings as a smoke test and only
prints (its numbers mean nothing).
Usage: python -m benchmarks.rl [--steps 30] [--batch 4] [--generations 8] [--warm-start 3] [--methods grpo,ppo]
       [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch

from benchmarks.report import (
    forwarded_options,
    machine_line,
    markdown_table,
    run_each,
    write_section,
)

MODEL = "smollm2-135m-instruct"
METHODS = ("grpo", "ppo")
QUICK = {"steps": 2, "batch": 2, "ppo_batch": 2, "generations": 2, "max_new_tokens": 6, "train": 8, "held_out": 4,
         "reward_steps": 2, "warm_start": 1}
SFT_ROWS = 200  # dates for the warm start, none of them among the RL prompts
SAMPLES = 4  # sampled answers per held-out prompt
NEAR_MISSES = 0.5  # share of the reward model's pairs that reject a near-miss date


def lora_model(task: str = "causal-lm"):
    from lmforge import AutoModelForCausalLM, AutoModelForSequenceClassification
    from lmforge.peft import LoraConfig, add_lora

    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(MODEL)
        add_lora(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=1)
        add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["score"]))
    return model


def warm_start(model, tokenizer, rows: list[dict], steps: int) -> float:
    """`steps` steps of LoRA SFT (8 rows each) merged into the weights, and fresh LoRA layers for RL on top;
    returns the seconds it took."""
    from lmforge.align import SFTConfig, SFTTrainer
    from lmforge.peft import LoraConfig, add_lora, merge_and_unload

    config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_batch_size=8, learning_rate=1e-3,
                       logging_steps=0, progress=False)
    clock = time.perf_counter()
    SFTTrainer(model, config, rows, tokenizer).train()
    merge_and_unload(model)
    add_lora(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    return time.perf_counter() - clock


def answer_scores(trainer, reward_model=None) -> dict[str, float]:
    """Greedy answers to the held-out prompts: mean dates reward, exact-match and well-formed shares, and the
    reward model's mean score when there is one; and the mean dates reward of SAMPLES answers per prompt
    sampled as in training (seeded), which sees the policy's whole distribution, not only its mode."""
    from lmforge.align.tasks import FORMAT_REWARD, iso_date_reward

    examples = trainer.eval_dataset
    texts = [output.outputs[0].text for output in trainer.complete(examples, 1, 0.0)]
    prompts, rows = [e["prompt"] for e in examples], [e["row"] for e in examples]
    answers = [row["response"] for row in rows]
    rewards = iso_date_reward(prompts, texts, answers)
    torch.manual_seed(1234)
    sampled = [(output.outputs, answer) for output, answer in
               zip(trainer.complete(examples, SAMPLES, trainer.args.temperature), answers)]
    sampled_rewards = [reward for outputs, answer in sampled
                       for reward in iso_date_reward(None, [o.text for o in outputs], [answer] * len(outputs))]
    scores = {"dates_reward": sum(rewards) / len(rewards), "exact": sum(r == 1.0 for r in rewards) / len(rewards),
              "well_formed": sum(r >= FORMAT_REWARD for r in rewards) / len(rewards), "example": texts[0],
              "sampled_reward": sum(sampled_rewards) / len(sampled_rewards)}
    if reward_model is not None:
        scores["rm_score"] = sum(reward_model.score(prompts, texts, rows)) / len(texts)
    return scores


def train_reward_model(tokenizer, args, result: dict):
    """A LoRA reward model on the dates preference pairs with near misses; its held-out pairwise accuracy
    (all pairs, near misses alone) and training time go into `result`."""
    from lmforge.align import (
        RewardConfig,
        RewardModel,
        RewardTrainer,
        tokenize_preferences,
    )
    from lmforge.align.tasks import date_preferences
    from lmforge.peft import merge_and_unload

    pairs = date_preferences(args.train + args.held_out, seed=1, near_misses=NEAR_MISSES)
    held_out = pairs[args.train:]
    scorer = lora_model("sequence-classification")
    config = RewardConfig(output_dir=tempfile.mkdtemp(), max_steps=args.reward_steps, per_device_batch_size=8,
                          learning_rate=args.reward_lr, logging_steps=0, progress=False)
    trainer = RewardTrainer(scorer, config, pairs[:args.train], tokenizer, eval_dataset=held_out)
    clock = time.perf_counter()
    trainer.train()
    result["reward_model_seconds"] = time.perf_counter() - clock
    result["pairwise_accuracy"] = trainer.evaluate()["pairwise_accuracy"]
    near = [pair for pair in held_out if pair["rejected"][:1].isdigit()]
    near_examples = tokenize_preferences(near, tokenizer, scorer.config.context_length, "error")[0]
    result["near_miss_accuracy"] = trainer.evaluate(near_examples)["pairwise_accuracy"]
    return RewardModel(merge_and_unload(scorer), tokenizer)


def measure(method: str, args) -> dict:
    from lmforge import AutoTokenizer
    from lmforge.align import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer
    from lmforge.align.tasks import date_rows, iso_date_reward
    from lmforge.peft import trainable_summary

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    rows = date_rows(args.train + args.held_out + SFT_ROWS)
    prompts = [{"prompt": row["instruction"], "response": row["response"]} for row in rows[:-SFT_ROWS]]
    train, held_out = prompts[:args.train], prompts[args.train:]
    common = {"output_dir": tempfile.mkdtemp(), "max_steps": args.steps, "max_new_tokens": args.max_new_tokens,
              "learning_rate": args.lr, "logging_steps": 1, "progress": False}
    result, reward_model = {}, None
    model = lora_model()
    if args.warm_start:
        result["warm_start_seconds"] = warm_start(model, tokenizer, rows[-SFT_ROWS:], args.warm_start)
    if method == "ppo":
        reward_model = train_reward_model(tokenizer, args, result)
        trainer = PPOTrainer(model, PPOConfig(**common, per_device_batch_size=args.ppo_batch, ppo_epochs=2), train,
                             tokenizer, reward_model, eval_dataset=held_out)
    else:
        config = GRPOConfig(**common, per_device_batch_size=args.batch, num_generations=args.generations)
        trainer = GRPOTrainer(model, config, train, tokenizer, iso_date_reward, eval_dataset=held_out)
    result["before"] = answer_scores(trainer, reward_model)
    clock = time.perf_counter()
    state = trainer.train()
    result["train_seconds"] = time.perf_counter() - clock
    result["after"] = answer_scores(trainer, reward_model)
    rewards = [record["reward"] for record in state.history if "reward" in record]
    third = max(len(rewards) // 3, 1)
    result.update(trainable=trainable_summary(model).trainable, steps=state.global_step,
                  train_reward_first=sum(rewards[:third]) / third, train_reward_last=sum(rewards[-third:]) / third,
                  peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return result


def write_report(results: dict[str, dict], args) -> None:
    rows = []
    for method, r in results.items():
        before, after = r["before"], r["after"]
        rm = f"{before['rm_score']:.2f} → {after['rm_score']:.2f}" if "rm_score" in before else "–"
        rows.append([method, f"{before['dates_reward']:.3f} → {after['dates_reward']:.3f}",
                     f"{before['sampled_reward']:.3f} → {after['sampled_reward']:.3f}",
                     f"{before['exact']:.0%} → {after['exact']:.0%}",
                     f"{before['well_formed']:.0%} → {after['well_formed']:.0%}", rm,
                     f"{r['train_reward_first']:.3f} → {r['train_reward_last']:.3f}",
                     f"{r['train_seconds'] / 60:.1f}", f"{r['peak_rss'] / 2**20:.0f}", repr(after["example"])])
    table = markdown_table(["method", "held-out dates reward (greedy)", f"(sampled, {SAMPLES} per prompt)",
                            "exact ISO date", "well-formed YYYY-MM-DD",
                            "reward-model score", "training reward (first → last third)", "train minutes",
                            "peak RSS MB", "first answer after"], rows)
    ppo = results.get("ppo")
    warm = next((r["warm_start_seconds"] for r in results.values() if "warm_start_seconds" in r), None)
    start = ("Both start from the instruct model." if warm is None else
             f"Both start from {args.warm_start} steps of LoRA SFT (8 rows each, {warm / 60:.1f} min, merged), which "
             "are \"before\" and the KL reference: SFT, then RL. Without it the instruct model's sampled answers "
             "almost never have the required shape, so every reward is 0 and there is nothing to compare.")
    reward_text = "" if ppo is None else (
        f" The reward model (LoRA r=8 + score head, {args.reward_steps} steps of 8 pairs, lr {args.reward_lr:g}, "
        f"{ppo['reward_model_seconds'] / 60:.1f} min) learns from pairs whose rejected answer is chatty or, in "
        f"{NEAR_MISSES:.0%} of them, a near miss (a valid date one field away, or the right date malformed: a "
        f"field unpadded, a digit dropped); held-out pairwise accuracy "
        f"{ppo['pairwise_accuracy']:.0%} ({ppo['near_miss_accuracy']:.0%} on the near misses alone).")
    write_section("rl", f"""
## Online RL: GRPO and PPO on the dates task (`benchmarks/rl.py`)

{machine_line()}. SmolLM2-135M-Instruct with LoRA r=8 on all linear layers, {args.steps} steps, answers of at
most {args.max_new_tokens} tokens, learning rate {args.lr:g}. {start}
GRPO: {args.batch} prompts per step, {args.generations} answers each, rewarded by `iso_date_reward` (1 for the
exact date; a well-formed YYYY-MM-DD of another date 0.1 + 0.3 per right field). PPO: {args.ppo_batch} prompts
per step, one answer each, 2 PPO epochs per rollout, rewarded by a reward model trained in the same
run.{reward_text} Held-out: {args.held_out} prompts answered greedily (and sampled {SAMPLES} times each) before →
after; each method in its own process.

{table}
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (rollouts) of each method")
    parser.add_argument("--batch", type=int, default=4, help="GRPO's prompts per step")
    parser.add_argument("--ppo-batch", type=int, default=8, help="PPO's prompts per step")
    parser.add_argument("--warm-start", type=int, default=3, help="LoRA SFT steps before RL (0: none)")
    parser.add_argument("--generations", type=int, default=8, help="GRPO's completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="longest sampled answer")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the LoRA policies")
    parser.add_argument("--train", type=int, default=200, help="training prompts (and reward-model pairs)")
    parser.add_argument("--held-out", type=int, default=40, help="held-out prompts (and pairs)")
    parser.add_argument("--reward-steps", type=int, default=60, help="reward model training steps (ppo)")
    parser.add_argument("--reward-lr", type=float, default=3e-4, help="reward model learning rate (ppo)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset to run")
    parser.add_argument("--quick", action="store_true", help="tiny settings, printed only: a smoke test")
    parser.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)  # one method in this process
    args = parser.parse_args()
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    results = run_each("benchmarks.rl", args.methods.split(","), forwarded_options(args))
    if not args.quick:
        write_report(results, args)


if __name__ == "__main__":
    main()
