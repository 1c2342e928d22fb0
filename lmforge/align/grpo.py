"""GRPO (Shao et al., 2024, DeepSeekMath): online RL whose advantages come from a group, not a value model.

For each prompt the policy samples G completions, and the reward scores each one. A completion's advantage
is how much better it did than its siblings on the same prompt:

    A_i = (r_i − mean(r_1..r_G)) / (std(r_1..r_G) + 1e-4)

(the sample standard deviation; a group whose completions all score alike has A = 0 and teaches nothing).
Every token of completion i shares A_i, and its loss (rollout.py) is

    L_t = −min(ratio_t · A_i, clip(ratio_t, 1 − ε, 1 + ε) · A_i) + β · KL_t,   KL_t = exp(d_t) − d_t − 1,
    d_t = log π_ref(y_t) − log π(y_t)

averaged over the completion's tokens, then over the completions: every completion weighs the same, however
long (the paper's choice, TRL's loss_type="grpo"). β = 0.04 is the paper's; β = 0 drops the KL term and with
it the reference model (TRL's default now). With the default num_iterations=1 each rollout makes one update,
the ratio is exactly 1 and the sampling-time log-probabilities need no extra forward pass; μ > 1 updates
reuse the rollout, with log π_old recorded when it was sampled.

Completions whose reward is None (a reward function that failed) are left out of their group's mean and
standard deviation and of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmforge.align.rollout import (
    RolloutConfig,
    RolloutTrainer,
    clipped_policy_loss,
    collate_rollout,
    inference,
    k3_kl,
)
from lmforge.errors import ValidationError

GROUP_STD_EPSILON = 1e-4


def group_statistics(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, sample standard deviation and count of the scored rewards (not NaN) of each group of
    `group_size` consecutive ones; the std is 0 for a group with fewer than two."""
    grouped = rewards.view(-1, group_size)
    scored = ~torch.isnan(grouped)
    count = scored.sum(-1)
    values = torch.where(scored, grouped, 0.0)
    mean = values.sum(-1) / count.clamp(min=1)
    squares = torch.where(scored, (grouped - mean[:, None]) ** 2, 0.0).sum(-1)
    std = torch.where(count > 1, (squares / (count - 1).clamp(min=1)).sqrt(), 0.0)
    return mean, std, count


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r − group mean) / (group std + 1e-4) for each reward, groups being `group_size` consecutive rewards;
    NaN (no reward) stays NaN, and a group with one scored completion gets 0."""
    mean, std, count = group_statistics(rewards, group_size)
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - mean[:, None]) / (std[:, None] + GROUP_STD_EPSILON)
    advantages = torch.where((count > 1)[:, None], advantages, torch.zeros_like(advantages))
    return torch.where(torch.isnan(grouped), grouped, advantages).view(-1)


@dataclass
class GRPOConfig(RolloutConfig):
    """RolloutConfig plus `num_generations` (G, completions per prompt), `beta` (the KL coefficient; 0 needs no
    reference), `epsilon` (the clip range) and `num_iterations` (updates per rollout). The learning rate
    suits LoRA; full fine-tuning wants about 1e-6."""

    num_generations: int = 4
    beta: float = 0.04
    epsilon: float = 0.2
    num_iterations: int = 1
    learning_rate: float = 2e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations < 2:
            raise ValidationError(f"GRPOConfig.num_generations must be >= 2 (advantages compare completions of one "
                                  f"prompt), got {self.num_generations}.")
        if self.beta < 0 or not self.epsilon > 0:
            raise ValidationError(f"GRPOConfig needs beta >= 0 and epsilon > 0; got beta={self.beta}, "
                                  f"epsilon={self.epsilon}.")
        if self.num_iterations < 1:
            raise ValidationError(f"GRPOConfig.num_iterations must be >= 1, got {self.num_iterations}.")


class GRPOTrainer(RolloutTrainer):
    """GRPO on prompt rows ({"prompt": text or chat messages} or {"messages": [...]}, plus the columns the
    reward reads). Each step samples `num_generations` completions of `per_device_batch_size` prompts (per
    micro-batch). Logs: reward (mean), reward_std (within groups), kl, clip_fraction, completion_length,
    skipped_samples."""

    def samples_per_prompt(self) -> int:
        return self.args.num_generations

    def updates_per_rollout(self) -> int:
        return self.args.num_iterations

    def uses_reference(self, args: GRPOConfig) -> bool:
        return args.beta > 0

    def updates(self, rollouts: list[list[dict[str, Any]]]) -> list[list[dict[str, torch.Tensor]]]:
        """num_iterations updates, each over all the step's micro-batches (one per micro-batch of prompts,
        the completions that scored, with their advantages and reference log-probabilities)."""
        micro_batches = []
        for samples in rollouts:
            rewards = torch.tensor([torch.nan if s["reward"] is None else s["reward"] for s in samples])
            _, std, count = group_statistics(rewards, self.args.num_generations)
            if (count > 1).any():
                self.record("reward_std", std[count > 1].mean().item(), int((count > 1).sum()))
            advantages = group_advantages(rewards, self.args.num_generations)
            scored = [{**sample, "advantage": advantage.item()}
                      for sample, advantage in zip(samples, advantages) if sample["reward"] is not None]
            if not scored:
                continue
            batch = collate_rollout(scored, self.pad_id)
            with torch.no_grad(), inference(self.model):
                if self.args.beta > 0:
                    batch["ref_logps"] = self.reference_logprobs(batch)
                if self.args.num_iterations > 1:
                    batch["old_logps"] = self.completion_forward(batch)[0]
            micro_batches.append(batch)
        return [micro_batches] * self.args.num_iterations

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["completion_mask"].shape[0]  # completions: each weighs the same

    def loss_sum(self, batch: dict[str, torch.Tensor], module: torch.nn.Module) -> torch.Tensor:
        """Σ over the batch's completions of their mean per-token loss."""
        logps, _ = self.completion_forward(batch, module)
        mask = batch["completion_mask"].to(self.device)
        old = batch["old_logps"].to(self.device) if "old_logps" in batch else logps.detach()
        advantages = batch["advantage"].to(self.device)[:, None]
        losses, clipped = clipped_policy_loss(logps, old, advantages, self.args.epsilon)
        tokens = mask.sum(-1).clamp(min=1)
        if self.args.beta > 0:
            kl = k3_kl(logps, batch["ref_logps"].to(self.device))
            losses = losses + self.args.beta * kl
            self.record("kl", ((kl * mask).sum(-1) / tokens).mean().item(), len(tokens))
        self.record("clip_fraction", ((clipped * mask).sum() / mask.sum()).item(), mask.sum().item())
        return ((losses * mask).sum(-1) / tokens).sum()
