"""Losses and evaluation metrics, summed over target tokens so batches of any shape add up exactly.

Every loss here returns a *sum* and the *number of targets* it covers, not a mean:
a mean of means weights a short sequence's tokens more than a long one's, while
sum / count over everything seen is the true per-token average. Training uses
that for gradient accumulation, evaluation for loss and perplexity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.errors import ValidationError
from lmforge.train.collate import IGNORE_INDEX

LOSS_TASKS = ("causal-lm", "masked-lm", "sequence-classification", "token-classification")


def targets(task: str, labels: torch.Tensor) -> torch.Tensor:
    """The labels the loss compares with each position's logits. Causal LM: position t predicts token t+1,
    so the labels move left by one and the last position gets none (-100). Shifting the labels rather
    than slicing the logits keeps the large logits tensor whole: no copy of it forward, none backward."""
    if task not in LOSS_TASKS:
        raise ValidationError(f"task must be one of {', '.join(LOSS_TASKS)} to compute a loss; got {task!r}.")
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) if task == "causal-lm" else labels


def count_targets(task: str, labels: torch.Tensor) -> int:
    """How many positions (or examples) the loss of this batch averages over."""
    return int((targets(task, labels) != IGNORE_INDEX).sum())


def loss_sum(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the non-ignored targets (bf16/fp16 logits are upcast to float32 first)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets(task, labels).reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro F1 (the unweighted mean of per-class F1, over classes seen in labels or predictions).

    Macro F1 treats a rare class as important as a frequent one, so a model that
    always answers the majority class scores high accuracy but low macro F1.
    """
    keep = labels != IGNORE_INDEX
    predictions, labels = predictions[keep], labels[keep]
    if labels.numel() == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    scores = []
    for cls in torch.unique(torch.cat([labels, predictions])):
        true_positive = ((predictions == cls) & (labels == cls)).sum().item()
        predicted, actual = (predictions == cls).sum().item(), (labels == cls).sum().item()
        scores.append(2 * true_positive / (predicted + actual))
    return {"accuracy": (predictions == labels).float().mean().item(), "macro_f1": sum(scores) / len(scores)}
