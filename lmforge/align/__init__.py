"""Alignment: teach a pretrained model behaviour. `sft` trains on example answers (loss on the
answer tokens only), `dpo` on preferences between two answers, `reward` a model that scores
answers from the same preferences; `grpo` and `ppo` learn online from the model's own sampled
answers, scored by a reward (`rewards`: a reward model or a function), through `rollout`. Each
is the training Trainer with another objective. `tasks` generates a checkable task to measure them on."""

from lmforge.align.dpo import (
    DPOConfig,
    DPOTrainer,
    PreferenceCollator,
    dpo_loss,
    sequence_logprobs,
    tokenize_preferences,
)
from lmforge.align.grpo import GRPOConfig, GRPOTrainer, group_advantages
from lmforge.align.ppo import PPOConfig, PPOTrainer, gae
from lmforge.align.reward import RewardConfig, RewardTrainer, bradley_terry_loss
from lmforge.align.rewards import RewardFunction, RewardModel, RewardSource
from lmforge.align.rollout import k3_kl
from lmforge.align.sft import (
    SFTConfig,
    SFTReport,
    SFTTrainer,
    conversation,
    read_rows,
    tokenize_rows,
)

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "GRPOConfig",
    "GRPOTrainer",
    "PPOConfig",
    "PPOTrainer",
    "PreferenceCollator",
    "RewardConfig",
    "RewardFunction",
    "RewardModel",
    "RewardSource",
    "RewardTrainer",
    "SFTConfig",
    "SFTReport",
    "SFTTrainer",
    "bradley_terry_loss",
    "conversation",
    "dpo_loss",
    "gae",
    "group_advantages",
    "k3_kl",
    "read_rows",
    "sequence_logprobs",
    "tokenize_preferences",
    "tokenize_rows",
]
