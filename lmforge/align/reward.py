"""Reward modelling: learn a scalar score of an answer from preferences between two answers.

The classic RLHF loop first trains a reward model, then optimises a policy against it (PPO).
The reward model is the language model with its next-token head replaced by a linear `score`
layer with one output (a sequence-classification model with num_labels=1): it reads the hidden
state of the last real token, which in a decoder is the only one that has seen the whole text.

Trained on the same (prompt, chosen, rejected) rows as DPO, it follows the Bradley–Terry model
of paired comparisons: the chosen answer wins with probability σ(r_chosen − r_rejected), so the
loss of a pair is

    −log σ(r_chosen − r_rejected)

Only differences of rewards are learned: adding a constant to every reward changes nothing.
Held-out pairwise accuracy (how often the chosen answer scores higher) measures the model.

Pairs are batched as for DPO (chosen rows first, right padding), and the attention mask tells the
head which token is the last real one, so padding does not change a reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.align.dpo import PairwiseTrainer, PreferenceCollator, evaluate_pairs, tokenize_preferences
from lmforge.errors import ValidationError
from lmforge.tokenizer import Tokenizer
from lmforge.train.collate import IGNORE_INDEX
from lmforge.train.trainer import TrainerCallback, TrainingArguments

REWARD_HEAD = "score"  # the scalar head of lmforge's decoder sequence classifiers; train it fully beside LoRA


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair −log σ(r_chosen − r_rejected)."""
    return -F.logsigmoid(chosen - rejected)


@dataclass
class RewardConfig(TrainingArguments):
    """TrainingArguments plus `max_length` and `overlong` as in SFTConfig."""

    max_length: int | None = None
    overlong: str = "error"
    learning_rate: float = 1e-5


class RewardTrainer(PairwiseTrainer):
    """The Trainer with the Bradley–Terry objective on (prompt, chosen, rejected) rows.

    `model` is a sequence-classification model with one label, e.g.
    `AutoModelForSequenceClassification.from_pretrained(ref, num_labels=1)`; with LoRA, list its
    head in `modules_to_save` (`LoraConfig(..., modules_to_save=["score"])`) so the new head trains.
    `evaluate()` reports the loss, pairwise accuracy (how often the chosen answer scores higher)
    and the mean reward margin r_chosen − r_rejected.
    """

    def __init__(self, model: torch.nn.Module, args: RewardConfig, train_dataset: Sequence[dict[str, Any]],
                 tokenizer: Tokenizer, eval_dataset: Sequence[dict[str, Any]] | None = None,
                 callbacks: Sequence[TrainerCallback] = ()):
        labels = getattr(getattr(model, "config", None), "num_labels", None)
        if labels != 1:
            raise ValidationError(f"a reward model gives one score per text, but {type(model).__name__} has "
                                  f"num_labels={labels}; load a sequence-classification model with one label: "
                                  "AutoModelForSequenceClassification.from_pretrained(ref, num_labels=1).")
        max_length = args.max_length or model.config.context_length
        train, self.dropped = tokenize_preferences(train_dataset, tokenizer, max_length, args.overlong)
        evaluation = (tokenize_preferences(eval_dataset, tokenizer, max_length, args.overlong)[0]
                      if eval_dataset else None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        super().__init__(model, args, train, PreferenceCollator(pad or 0), eval_dataset=evaluation,
                         task="sequence-classification", callbacks=callbacks)

    def pair_terms(self, batch: dict[str, torch.Tensor], module: torch.nn.Module | None = None):
        """(per-pair loss, per-pair reward margin, mask of real pairs) of a batch."""
        rewards = self._forward(batch, module).float().squeeze(-1)
        labels = batch["labels"]
        pairs = labels.shape[0] // 2
        real = (labels[:pairs] != IGNORE_INDEX).any(-1).to(rewards.device)  # a stand-in batch has no target
        margins = rewards[:pairs] - rewards[pairs:]
        return bradley_terry_loss(rewards[:pairs], rewards[pairs:]), margins.detach(), real

    def evaluate(self, dataset: Sequence[dict] | None = None) -> dict[str, float]:
        loss, accuracy, margin = evaluate_pairs(self, self.eval_dataset if dataset is None else dataset)
        return {"loss": loss, "pairwise_accuracy": accuracy, "reward_margin": margin}
