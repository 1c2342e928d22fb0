"""Alignment: teach a pretrained model behaviour. `sft` trains on example answers (loss on the
answer tokens only); preference tuning and reinforcement learning build on the same Trainer."""

from lmforge.align.sft import SFTConfig, SFTReport, SFTTrainer, conversation, read_rows, tokenize_rows

__all__ = ["SFTConfig", "SFTReport", "SFTTrainer", "conversation", "read_rows", "tokenize_rows"]
