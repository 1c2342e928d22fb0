"""Alignment: teach a pretrained model behaviour. `sft` trains on example answers (loss on the
answer tokens only), `dpo` on preferences between two answers, `reward` a model that scores
answers from the same preferences; each is the training Trainer with another objective.
`tasks` generates a checkable task to measure them on."""

from lmforge.align.dpo import (
    DPOConfig,
    DPOTrainer,
    PreferenceCollator,
    dpo_loss,
    sequence_logprobs,
    tokenize_preferences,
)
from lmforge.align.reward import RewardConfig, RewardTrainer, bradley_terry_loss
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
    "PreferenceCollator",
    "RewardConfig",
    "RewardTrainer",
    "SFTConfig",
    "SFTReport",
    "SFTTrainer",
    "bradley_terry_loss",
    "conversation",
    "dpo_loss",
    "read_rows",
    "sequence_logprobs",
    "tokenize_preferences",
    "tokenize_rows",
]
