"""PPO for RLHF (Schulman et al., 2017; Ouyang et al., 2022): the classic loop with a value model.

Each step samples one completion per prompt and scores it with a reward model. Each completion token y_t is
an action, rewarded with a KL penalty that keeps the policy near its reference, plus the score at the end:

    r_t = −β · (log π_old(y_t) − log π_ref(y_t))  (+ score, at the last token)

A value head (a scalar Linear on the policy's final hidden state, trained fully beside LoRA or the full
weights) predicts V_t, the return to expect from position t on. Generalised advantage estimation mixes
its one-step and Monte-Carlo estimates of how much better than expected a token did:

    δ_t = r_t + γ · V_{t+1} − V_t     (V after the last token is 0)
    A_t = δ_t + γλ · A_{t+1}          returns R_t = A_t + V_t

The advantages are whitened (zero mean, unit variance over the rollout's tokens), then `ppo_epochs` passes
over the rollout in `num_mini_batches` shuffled minibatches each update the policy with the clipped loss
(rollout.py) and the value head with a clipped value loss, both averaged over completion tokens:

    L_V = ½ · max((V − R)², (V_old + clip(V − V_old, −c, c) − R)²)     loss = L_clip + vf_coef · L_V

Logs: reward (the mean score), kl (Σ_t log π_old − log π_ref per completion, averaged), policy_loss,
value_loss, clip_fraction, explained_variance (1 − Var(R − V) / Var(R) of the rollout's value estimates),
completion_length, skipped_samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.align.rollout import RolloutConfig, RolloutTrainer, clipped_policy_loss, collate_rollout, inference
from lmforge.errors import ValidationError
from lmforge.train.trainer import TrainerState


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards [N, C]: −β · kl_t on every completion token, plus each completion's score on its last."""
    rewards = -beta * kl * mask
    last = mask.sum(-1).long() - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [N, C] by generalised advantage estimation over each row's completion tokens
    (mask 1, right-padded); zero past each row's end."""
    rewards, values = rewards * mask, values * mask
    advantages, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        running = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit variance."""
    return (values - values.mean()) * torch.rsqrt(values.var(unbiased=False) + 1e-8)


@dataclass
class PPOConfig(RolloutConfig):
    """RolloutConfig plus `beta` (the KL penalty per token), `gamma` and `lam` (GAE), `ppo_epochs` passes over each
    rollout in `num_mini_batches` minibatches (one optimizer update each), `epsilon` (the policy clip range),
    `value_clip` (the value clip range) and `vf_coef` (the value loss's weight). The learning rate suits LoRA."""

    beta: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    ppo_epochs: int = 4
    num_mini_batches: int = 1
    epsilon: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    learning_rate: float = 2e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ppo_epochs < 1 or self.num_mini_batches < 1:
            raise ValidationError(f"PPOConfig.ppo_epochs and num_mini_batches must be >= 1; got {self.ppo_epochs} "
                                  f"and {self.num_mini_batches}.")
        if self.beta < 0 or not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValidationError(f"PPOConfig needs beta >= 0 and gamma, lam in [0, 1]; got beta={self.beta}, "
                                  f"gamma={self.gamma}, lam={self.lam}.")
        if not (self.epsilon > 0 and self.value_clip > 0 and self.vf_coef >= 0):
            raise ValidationError(f"PPOConfig needs epsilon > 0, value_clip > 0 and vf_coef >= 0; got {self.epsilon}, "
                                  f"{self.value_clip} and {self.vf_coef}.")


class PPOTrainer(RolloutTrainer):
    """PPO on prompt rows with a reward (usually a RewardModel; any reward source works).

    The value head is `trainer.value_head`, a Linear(hidden_size, 1) that starts at zero. While `train()` runs it
    is registered as `model.value_head`, so that the optimizer, checkpoints and resume carry it; `train()`
    takes it off again at the end, leaving the policy as it came.
    """

    def __init__(self, model: torch.nn.Module, args: PPOConfig, train_dataset: Sequence[dict[str, Any]], tokenizer,
                 reward, eval_dataset: Sequence[dict[str, Any]] | None = None,
                 reference_model: torch.nn.Module | None = None, callbacks=()):
        parameter = next(model.parameters())
        self.value_head = nn.Linear(model.config.hidden_size, 1, device=parameter.device, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        model.value_head = self.value_head  # registered while the Trainer builds the optimizer
        try:
            super().__init__(model, args, train_dataset, tokenizer, reward, eval_dataset, reference_model, callbacks)
        finally:
            del model.value_head
        if self.reference_model is not None and hasattr(self.reference_model, "value_head"):
            del self.reference_model.value_head  # copied along with the policy; the reference needs none

    def updates_per_rollout(self) -> int:
        return self.args.ppo_epochs * self.args.num_mini_batches

    def train(self, resume_from: str | Path | None = None) -> TrainerState:
        self.model.value_head = self.value_head
        try:
            return super().train(resume_from)
        finally:
            del self.model.value_head

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """V_t [N, C] from the final hidden states at the positions that predict each completion token."""
        return self.value_head(hidden.float()).squeeze(-1)

    def updates(self, rollouts: list[list[dict[str, Any]]]) -> list[list[dict[str, torch.Tensor]]]:
        """Score → per-token rewards → GAE over each micro-batch of the rollout, whitened over all of it; then
        ppo_epochs × num_mini_batches updates on shuffled minibatches (micro-batches of per_device_batch_size)."""
        samples = []
        for rollout in rollouts:
            scored = [sample for sample in rollout if sample["reward"] is not None]
            if not scored:
                continue
            batch = collate_rollout(scored, self.pad_id)
            with torch.no_grad(), inference(self.model):
                logps, hidden = self.completion_forward(batch)
                values = self.values(hidden).cpu()
                kl = (logps - self.reference_logprobs(batch)).cpu()
            mask = batch["completion_mask"]
            scores = torch.tensor([sample["reward"] for sample in scored])
            advantages, returns = gae(token_rewards(scores, kl, mask, self.args.beta), values, mask, self.args.gamma,
                                      self.args.lam)
            self.record("kl", (kl * mask).sum(-1).mean().item(), len(scored))
            for i, sample in enumerate(scored):
                length = len(sample["completion_ids"])
                sample.update(old_logps=logps[i, :length].cpu(), values=values[i, :length],
                              advantages=advantages[i, :length], returns=returns[i, :length])
            samples += scored
        every = {name: torch.cat([sample[name] for sample in samples]) for name in ("advantages", "returns", "values")}
        whitened = whiten(every["advantages"]).split([len(sample["completion_ids"]) for sample in samples])
        for sample, advantages in zip(samples, whitened):
            sample["advantages"] = advantages
        if len(every["returns"]) > 1 and every["returns"].var() > 0:
            explained = 1 - (every["returns"] - every["values"]).var() / every["returns"].var()
            self.record("explained_variance", explained.item(), len(every["returns"]))
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step)
        updates = []
        for _ in range(self.args.ppo_epochs):
            order = torch.randperm(len(samples), generator=generator)
            for minibatch in order.chunk(self.args.num_mini_batches):
                updates.append([collate_rollout([samples[i] for i in part.tolist()], self.pad_id)
                                for part in minibatch.split(self.args.per_device_batch_size)])
        return updates

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["completion_mask"].sum())  # completion tokens

    def loss_sum(self, batch: dict[str, torch.Tensor], module: torch.nn.Module) -> torch.Tensor:
        """Σ over the batch's completion tokens of the clipped policy loss + vf_coef × the clipped value loss."""
        logps, hidden = self.completion_forward(batch, module)
        values = self.values(hidden)
        mask, old, old_values, advantages, returns = (batch[name].to(self.device) for name in (
            "completion_mask", "old_logps", "values", "advantages", "returns"))
        policy, clipped = clipped_policy_loss(logps, old, advantages, self.args.epsilon)
        clipped_values = old_values + (values - old_values).clamp(-self.args.value_clip, self.args.value_clip)
        value = 0.5 * torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
        tokens = mask.sum().item()
        self.record("policy_loss", ((policy * mask).sum() / tokens).item(), tokens)
        self.record("value_loss", ((value * mask).sum() / tokens).item(), tokens)
        self.record("clip_fraction", ((clipped * mask).sum() / tokens).item(), tokens)
        return ((policy + self.args.vf_coef * value) * mask).sum()
