"""Alignment: teach a pretrained model behaviour. `sft` trains on example answers (loss on the
answer tokens only), `dpo` on preferences between two answers; both are the training Trainer
with another objective. `tasks` generates a checkable task to measure them on."""

from lmforge.align.dpo import (
    DPOConfig,
    DPOTrainer,
    PreferenceCollator,
    dpo_loss,
    sequence_logprobs,
    tokenize_preferences,
)
from lmforge.align.sft import SFTConfig, SFTReport, SFTTrainer, conversation, read_rows, tokenize_rows

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "PreferenceCollator",
    "SFTConfig",
    "SFTReport",
    "SFTTrainer",
    "conversation",
    "dpo_loss",
    "read_rows",
    "sequence_logprobs",
    "tokenize_preferences",
    "tokenize_rows",
]
