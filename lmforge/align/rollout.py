"""Online RL on a language model: rollouts (prompts → sampled completions → rewards), the log-probabilities
and losses they are trained with, and the Trainer that runs them. GRPO (grpo.py) and PPO (ppo.py) are this
loop with their own advantages.

SFT and DPO learn from answers written in advance; online RL learns from the model's own. Each step takes a
batch of prompts, samples completions from the current policy π_old (lmforge's generation, in eval mode,
seeded), scores them (rewards.py), turns the scores into advantages A_t (how much better than expected a
token's completion did) and updates the policy with the clipped surrogate loss of PPO:

    ratio_t = π(y_t | x, y_<t) / π_old(y_t | x, y_<t)
    L_t     = −min(ratio_t · A_t, clip(ratio_t, 1 − ε, 1 + ε) · A_t)

With one update per rollout π is π_old, the ratio is exactly 1 and the gradient is the policy gradient
A_t · ∇log π(y_t). Several updates on one rollout (GRPO's num_iterations, PPO's ppo_epochs) are what the clip
is for: once the ratio has moved beyond 1 ± ε in the advantage's direction, the token stops pulling.

A reference π_ref (the starting model: LoRA switched off, or a frozen copy, as in DPO) keeps the policy from
drifting into text that games the reward. Per token, with d_t = log π_ref(y_t) − log π(y_t), the k3 estimator

    KL_t = exp(d_t) − d_t − 1

is ≥ 0, an unbiased estimate of KL(π‖π_ref) on samples from π, and 0 exactly where the two agree.

Log-probabilities are those of the distribution tokens were drawn from: softmax(logits / temperature).
Dropout would make π differ from π_old by noise alone; RL usually trains without it (LoRA's lora_dropout=0).
A sequence is laid out as [prompt, left-padded | completion, right-padded], so the completion sits in the same
columns in every row and only its C tokens (+1) need the vocabulary projection.
"""

from __future__ import annotations

import copy
import logging
import math
from abc import ABCMeta, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.align.dpo import has_lora
from lmforge.align.rewards import RewardFunction, RewardSource, as_reward
from lmforge.align.sft import OVERLONG
from lmforge.errors import InputError, UnsupportedError, ValidationError
from lmforge.generation import RequestOutput, SamplingParams, generate
from lmforge.tokenizer import Tokenizer
from lmforge.train.schedules import build_scheduler
from lmforge.train.trainer import Trainer, TrainerCallback, TrainingArguments

logger = logging.getLogger(__name__)

TOKEN_FIELDS = ("old_logps", "ref_logps", "values", "advantages", "returns")  # per completion token
SCALAR_FIELDS = ("advantage",)  # per completion


# ----- prompts ---------------------------------------------------------------------------------


def row_prompt(row: Any, number: int) -> str | list[dict[str, str]]:
    """The prompt of a row: its 'prompt' (text or chat messages) or its 'messages' (the conversation so far)."""
    if not isinstance(row, dict):
        raise InputError(f"row {number} is {type(row).__name__}, not an object with a 'prompt'.")
    if "prompt" not in row and "messages" not in row:
        raise InputError(f"row {number}: no 'prompt' (it has {', '.join(sorted(row)) or 'no fields'}); a prompt row "
                         "is {\"prompt\": text or chat messages} or {\"messages\": [...]}, plus any columns the reward "
                         "reads.")
    field = "prompt" if "prompt" in row else "messages"
    prompt = row[field]
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise InputError(f"row {number}: {field!r} must be text or a non-empty list of chat messages; got "
                         f"{type(prompt).__name__}.")
    for message in prompt:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise InputError(f"row {number}: every message needs a 'role' and a string 'content'; got {message!r}.")
    if prompt[-1]["role"] == "assistant":
        raise InputError(f"row {number}: the conversation ends with an assistant turn; a prompt ends with the turn the "
                         "policy answers (usually the user's).")
    return prompt


def prompt_token_ids(prompt: str | list[dict[str, str]], number: int, tokenizer: Tokenizer) -> list[int]:
    """The ids the policy continues: the chat template with the generation prompt when the tokenizer has one
    (exactly as SFT and DPO render prompts), else the text itself."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                                add_special_tokens=False)
    if isinstance(prompt, list):
        raise InputError(f"row {number}: chat messages need a tokenizer with a chat template, and this one has none; "
                         "give the prompt as text.")
    return tokenizer.encode(prompt)


def prompt_examples(rows: Sequence[dict[str, Any]], tokenizer: Tokenizer, max_length: int,
                    overlong: str = "error") -> tuple[list[dict[str, Any]], int]:
    """{"input_ids", "prompt", "row"} for every row; returns them and how many were dropped for length.
    A prompt longer than `max_length` is an error, cut to its last max_length tokens ("truncate") or
    dropped ("skip")."""
    if overlong not in OVERLONG:
        raise ValidationError(f"overlong must be one of {', '.join(OVERLONG)}; got {overlong!r}.")
    examples, dropped = [], 0
    for number, row in enumerate(rows, 1):
        prompt = row_prompt(row, number)
        ids = prompt_token_ids(prompt, number, tokenizer)
        if len(ids) > max_length:
            if overlong == "error":
                raise InputError(f"row {number}: the prompt has {len(ids)} tokens, more than max_length={max_length} "
                                 "(by default the model's positions minus max_new_tokens); shorten it, or set "
                                 "overlong='truncate' (keeps its last tokens) or 'skip'.")
            if overlong == "skip":
                dropped += 1
                continue
            ids = ids[-max_length:]
        examples.append({"input_ids": ids, "prompt": prompt, "row": row})
    if not examples:
        raise InputError(f"all {len(rows)} prompts were dropped as longer than max_length={max_length}.")
    return examples, dropped


# ----- log-probabilities and losses -----------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature); logits [N, C, V] predict token_ids [N, C]."""
    logits = logits.float() / temperature
    picked = torch.gather(logits, 2, token_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π‖π_ref): exp(d) − d − 1 with d = log π_ref − log π."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token −min(ratio·A, clip(ratio, 1 − ε, 1 + ε)·A) with ratio = exp(log π − log π_old), and where
    the clipped term is the smaller one (the token no longer pulls)."""
    ratio = torch.exp(logps - old_logps)
    unclipped, clipped = ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def collate_rollout(samples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Samples as one batch: input_ids and attention_mask [N, P + C] laid out [prompt, left-padded |
    completion, right-padded], completion_ids and completion_mask [N, C], the per-token fields the
    samples carry padded with 0 to [N, C], the per-completion ones as [N]."""
    width_p = max(len(s["prompt_ids"]) for s in samples)
    width_c = max(len(s["completion_ids"]) for s in samples)
    ids = torch.full((len(samples), width_p + width_c), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    completion_mask = torch.zeros(len(samples), width_c)
    for i, sample in enumerate(samples):
        prompt, completion = sample["prompt_ids"], sample["completion_ids"]
        ids[i, width_p - len(prompt):width_p] = torch.tensor(prompt)
        ids[i, width_p:width_p + len(completion)] = torch.tensor(completion)
        mask[i, width_p - len(prompt):width_p + len(completion)] = 1
        completion_mask[i, :len(completion)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "completion_ids": ids[:, width_p:],
             "completion_mask": completion_mask}
    for field in TOKEN_FIELDS:
        if field in samples[0]:
            batch[field] = torch.zeros(len(samples), width_c)
            for i, sample in enumerate(samples):
                batch[field][i, :len(sample[field])] = sample[field]
    for field in SCALAR_FIELDS:
        if field in samples[0]:
            batch[field] = torch.tensor([float(sample[field]) for sample in samples])
    return batch


@contextmanager
def inference(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The policy in eval mode for sampling and the rollout's forward passes; afterwards its training mode
    again. (Generation's fused q/k/v and gate/up keep the Parameter objects the optimizer holds and serve
    only gradient-free forwards: see lmforge.nn.fusion.)"""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


# ----- the trainer ------------------------------------------------------------------------------


@dataclass
class RolloutConfig(TrainingArguments):
    """TrainingArguments plus sampling (`max_new_tokens`, `temperature`, `top_p`) and prompt length:
    `max_length`, the longest prompt in tokens (None: the model's positions minus max_new_tokens), and
    `overlong` for a longer one ("error", "truncate": keep its last tokens, "skip").
    `per_device_batch_size` counts prompts."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    max_length: int | None = None
    overlong: str = "error"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.max_new_tokens < 1:
            raise ValidationError(f"{name}.max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not self.temperature > 0:
            raise ValidationError(f"{name}.temperature must be > 0 (the policy samples; log-probabilities divide by "
                                  f"it), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValidationError(f"{name}.top_p must be in (0, 1], got {self.top_p}.")
        if self.overlong not in OVERLONG:
            raise ValidationError(f"{name}.overlong must be one of {', '.join(OVERLONG)}; got {self.overlong!r}.")


class RolloutTrainer(Trainer, metaclass=ABCMeta):
    """The Trainer on prompt rows. Each step samples `samples_per_prompt()` completions of every prompt,
    scores them with `reward`, and makes the optimizer updates that the subclass's `updates(rollouts)`
    lays out (each a list of collated micro-batches, whose `loss_sum` / `count_targets` the Trainer
    accumulates). Optimizer, schedule (counted in updates), clipping, logs, checkpoints, callbacks and
    resume are the Trainer's.

    `reward` is a RewardSource, a reward function, "module:function" or a reward model folder. Completions
    it gives no reward are left out of the update; a step where none scored makes no update. The reference
    (for subclasses that use one) is the model with LoRA switched off, else `reference_model` or a frozen
    copy made now. `evaluate()` scores greedy completions of held-out prompts.
    """

    def __init__(self, model: torch.nn.Module, args: RolloutConfig, train_dataset: Sequence[dict[str, Any]],
                 tokenizer: Tokenizer, reward: RewardSource | Callable[..., Any] | str,
                 eval_dataset: Sequence[dict[str, Any]] | None = None,
                 reference_model: torch.nn.Module | None = None, callbacks: Sequence[TrainerCallback] = ()):
        self.max_length = args.max_length or model.config.context_length - args.max_new_tokens
        if self.max_length < 1:
            raise ValidationError(f"max_new_tokens={args.max_new_tokens} leaves no room for a prompt in the model's "
                                  f"{model.config.context_length} positions; lower it.")
        self.reward, self.tokenizer = as_reward(reward), tokenizer
        train, self.dropped = self.prompt_set(train_dataset, args.overlong)
        evaluation = self.prompt_set(eval_dataset, args.overlong)[0] if eval_dataset else None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad or 0
        if self.uses_reference(args) and reference_model is None and not has_lora(model):
            reference_model = copy.deepcopy(model)
        super().__init__(model, args, train, list, eval_dataset=evaluation, task="causal-lm", callbacks=callbacks)
        if self.context.is_distributed:
            raise UnsupportedError("GRPO and PPO train in one process (each samples its own rollouts); launch "
                                   "without torchrun.")
        self.reference_model = None
        if reference_model is not None and self.uses_reference(args):
            self.reference_model = reference_model.to(self.device).eval().requires_grad_(False)
        updates = self.updates_per_rollout()
        if updates > 1:  # the schedule counts optimizer updates, several per step
            warmup = args.warmup_steps or math.ceil(args.warmup_ratio * self.total_steps)
            self.scheduler = build_scheduler(self.optimizer, args.lr_scheduler, warmup * updates,
                                             self.total_steps * updates)
        self._means: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # name → [weighted sum, weight]
        self._totals: dict[str, int] = {"skipped_samples": 0}
        self._step_tokens = 0

    # ----- what a subclass defines ---------------------------------------------------------------

    def samples_per_prompt(self) -> int:
        """Completions sampled per prompt in a training step."""
        return 1

    def updates_per_rollout(self) -> int:
        """Optimizer updates a training step makes (the schedule counts them)."""
        return 1

    def uses_reference(self, args: RolloutConfig) -> bool:
        """Whether the objective needs log π_ref (if not, no reference copy is made)."""
        return True

    @abstractmethod
    def updates(self, rollouts: list[list[dict[str, Any]]]) -> list[list[dict[str, torch.Tensor]]]:
        """The step's optimizer updates, each a list of micro-batches, from its rollouts (one list of samples
        per micro-batch of prompts, `samples_per_prompt()` consecutive samples per prompt)."""

    # ----- rollouts ---------------------------------------------------------------------------------

    def prompt_set(self, rows: Sequence[dict[str, Any]], overlong: str) -> tuple[list[dict[str, Any]], int]:
        """`prompt_examples` of the rows, which must also hold the columns a reward function requires."""
        examples, dropped = prompt_examples(rows, self.tokenizer, self.max_length, overlong)
        if isinstance(self.reward, RewardFunction):
            self.reward.check_columns(rows)
        return examples, dropped

    def complete(self, examples: Sequence[dict[str, Any]], n: int, temperature: float) -> list[RequestOutput]:
        """`n` completions of each prompt example from the current policy (temperature 0: greedy). Each
        completion draws its own seed from torch's RNG, which the Trainer seeds and checkpoints."""
        params = SamplingParams(n=n, temperature=temperature, top_p=self.args.top_p,
                                max_tokens=self.args.max_new_tokens)
        with inference(self.model):
            return generate(self.model, self.tokenizer, [example["input_ids"] for example in examples], params)

    def roll_out(self, examples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Sample and score completions of a micro-batch of prompts; one dict per completion, with its
        prompt_ids, completion_ids, text, prompt, row and reward (None: no reward)."""
        outputs = self.complete(examples, self.samples_per_prompt(), self.args.temperature)
        samples = [{"prompt_ids": example["input_ids"], "completion_ids": completion.token_ids,
                    "text": completion.text, "prompt": example["prompt"], "row": example["row"]}
                   for example, output in zip(examples, outputs) for completion in output.outputs]
        rewards = self.reward.score([s["prompt"] for s in samples], [s["text"] for s in samples],
                                    [s["row"] for s in samples])
        if len(rewards) != len(samples):
            raise ValidationError(f"the reward source {type(self.reward).__name__} returned {len(rewards)} rewards "
                                  f"for {len(samples)} completions; its score() must return one per completion.")
        for sample, reward in zip(samples, rewards):
            sample["reward"] = reward
        return samples

    def completion_forward(self, batch: dict[str, torch.Tensor],
                           module: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities of the completion tokens [N, C] at the sampling temperature, the final hidden
        states at the positions that predict them [N, C, D])."""
        width = batch["completion_ids"].shape[1]
        with self.autocast:
            output = (module or self.model)(input_ids=batch["input_ids"].to(self.device),
                                            attention_mask=batch["attention_mask"].to(self.device),
                                            logits_to_keep=width + 1)
        logps = token_logprobs(output.logits[:, :-1], batch["completion_ids"].to(self.device), self.args.temperature)
        return logps, output.last_hidden_state[:, -width - 1:-1]

    def reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log π_ref of the completion tokens: the reference copy, or the policy with its LoRA switched off."""
        if self.reference_model is not None:
            return self.completion_forward(batch, self.reference_model)[0]
        from lmforge.peft import lora_disabled

        with lora_disabled(self.model):
            return self.completion_forward(batch)[0]

    # ----- one step ----------------------------------------------------------------------------------

    def training_step(self, batches: list[list[dict[str, Any]]]) -> tuple[float, float]:
        """Roll out the step's prompts, then make the subclass's updates; returns the mean loss and gradient
        norm over them (NaN for a skipped step)."""
        rollouts = [self.roll_out(examples) for examples in batches]
        samples = [sample for rollout in rollouts for sample in rollout]
        rewards = [sample["reward"] for sample in samples if sample["reward"] is not None]
        self._step_tokens = sum(len(s["prompt_ids"]) + len(s["completion_ids"]) for s in samples)
        self.record("completion_length", sum(len(s["completion_ids"]) for s in samples) / len(samples), len(samples))
        self._totals["skipped_samples"] += len(samples) - len(rewards)
        if not rewards:
            logger.warning("step %d: none of its %d completions got a reward (see the warnings above), so the step "
                           "makes no update.", self.state.global_step + 1, len(samples))
            self._totals["skipped_steps"] = self._totals.get("skipped_steps", 0) + 1
            return math.nan, math.nan
        self.record("reward", sum(rewards) / len(rewards), len(rewards))
        losses, norms = [], []
        for micro_batches in self.updates(rollouts):
            loss, norm = super().training_step(micro_batches)
            losses.append(loss)
            norms.append(norm)
        return sum(losses) / len(losses), sum(norms) / len(norms)

    # ----- logs -----------------------------------------------------------------------------------------

    def record(self, name: str, value: float, weight: float = 1.0) -> None:
        """Add `value` (with `weight`) to the mean of `name` in the next training log record."""
        self._means[name][0] += value * weight
        self._means[name][1] += weight

    def step_tokens(self, batches: list[list[dict[str, Any]]]) -> int:
        return self._step_tokens

    def step_metrics(self) -> dict[str, float]:
        """The means recorded since the last log record (and the skipped samples and steps, summed)."""
        metrics = {name: total / max(weight, 1e-12) for name, (total, weight) in self._means.items()}
        metrics.update(self._totals)
        self._means.clear()
        self._totals = {"skipped_samples": 0}
        return metrics

    # ----- evaluation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, dataset: Sequence[dict[str, Any]] | None = None) -> dict[str, float]:
        """Greedy completions of prompt rows (default: eval_dataset), scored: the mean `reward` over those that
        scored, `completion_length` in tokens, `skipped_samples`; `loss` is −reward, so that periodic
        evaluation and early stopping, which keep the lowest eval loss, keep the best reward."""
        examples = self.eval_dataset if dataset is None else self.prompt_set(dataset, self.args.overlong)[0]
        if not examples:
            raise ValidationError("evaluate() needs prompt rows; pass some or set eval_dataset.")
        rewards, lengths = [], []
        size = self.args.per_device_batch_size * self.samples_per_prompt()
        for start in range(0, len(examples), size):
            chunk = examples[start:start + size]
            completions = [output.outputs[0] for output in self.complete(chunk, 1, 0.0)]
            rewards += self.reward.score([e["prompt"] for e in chunk], [c.text for c in completions],
                                         [e["row"] for e in chunk])
            lengths += [len(c.token_ids) for c in completions]
        scored = [reward for reward in rewards if reward is not None]
        mean = sum(scored) / len(scored) if scored else math.nan
        return {"loss": 0.0 - mean, "reward": mean, "completion_length": sum(lengths) / len(lengths),
                "skipped_samples": len(rewards) - len(scored)}
