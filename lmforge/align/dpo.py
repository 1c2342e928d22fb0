"""DPO (Rafailov et al., 2023): learn from preferences without a reward model or sampling.

Each example is a prompt with two answers, one preferred (chosen) and one not (rejected).
With log π(y|x) the summed log-probability of an answer's tokens under the model being
trained and log π_ref(y|x) under a frozen reference (the starting model), DPO's implicit
reward of an answer is β · (log π − log π_ref) and the loss is

    −log σ(β · [(log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected))])

which raises the chosen answer's probability relative to the rejected one, while β keeps
the policy near the reference (a larger β, a tighter leash). IPO replaces the logistic loss
by a squared one, (margin − 1/(2β))², which does not push margins to infinity.

The reference costs no second copy of the weights when the model trains LoRA adapters:
the same model with its adapters switched off *is* the reference. A fully fine-tuned model
needs a frozen copy (made once at start).

Chosen and rejected answers go through the model as one batch (chosen rows first), so one
forward pass serves both.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.align.sft import fit_length, tokenize_row
from lmforge.distributed.process_group import all_reduce_sum
from lmforge.errors import InputError, ValidationError
from lmforge.tokenizer import Tokenizer
from lmforge.train.collate import IGNORE_INDEX, PaddingCollator
from lmforge.train.trainer import Trainer, TrainerCallback, TrainingArguments

LOSS_TYPES = ("sigmoid", "ipo")

def answer_row(row: dict[str, Any], answer: str, number: int, chat: bool) -> dict[str, Any]:
    """An SFT-shaped row: the prompt (a string or chat messages) followed by one answer."""
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        return {"messages": [*prompt, {"role": "assistant", "content": answer}]}
    if not isinstance(prompt, str):
        raise InputError(f"row {number}: 'prompt' is {'missing' if prompt is None else type(prompt).__name__}; it "
                         "must be a string or a list of chat messages.")
    if chat:
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    return {"prompt": prompt, "completion": answer}


def tokenize_preferences(rows: Sequence[dict[str, Any]], tokenizer: Tokenizer, max_length: int | None = None,
                         overlong: str = "error") -> tuple[list[dict[str, list[int]]], int]:
    """Token ids and answer-only labels of both answers of every (prompt, chosen, rejected) row;
    returns the examples and how many rows were dropped for length. Prompts are rendered with
    the chat template when the tokenizer has one."""
    chat = bool(tokenizer.chat_template)
    examples, dropped = [], 0
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise InputError(f"row {number} is {type(row).__name__}, not an object with prompt, chosen, rejected.")
        answers = {}
        for side in ("chosen", "rejected"):
            if not isinstance(row.get(side), str):
                raise InputError(f"row {number}: {side!r} is {'missing' if row.get(side) is None else 'not a string'}; "
                                 "a preference row needs 'prompt', 'chosen' and 'rejected'.")
            ids, labels = tokenize_row(answer_row(row, row[side], number, chat), number, tokenizer)
            answers[side] = fit_length(ids, labels, max_length, overlong, number)
        if answers["chosen"] is None or answers["rejected"] is None:
            dropped += 1
            continue
        examples.append({"chosen_input_ids": answers["chosen"][0], "chosen_labels": answers["chosen"][1],
                         "rejected_input_ids": answers["rejected"][0], "rejected_labels": answers["rejected"][1]})
    if not examples:
        raise InputError(f"all {len(rows)} preference rows were dropped as longer than max_length={max_length}.")
    return examples, dropped


@dataclass
class PreferenceCollator:
    """A batch of B pairs as 2B padded rows: the chosen answers, then the rejected ones."""

    pad_token_id: int

    def __call__(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": e[f"{side}_input_ids"], "labels": e[f"{side}_labels"]}
                for side in ("chosen", "rejected") for e in examples]
        return PaddingCollator(self.pad_token_id)(rows)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ log p(token) over each row's answer tokens (labels != -100), with the causal shift."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE_INDEX
    picked = torch.gather(F.log_softmax(logits, dim=-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid") -> torch.Tensor:
    """Per-pair DPO (or IPO) loss from the four sequence log-probabilities."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss_type == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    return -F.logsigmoid(beta * margin)


@dataclass
class DPOConfig(TrainingArguments):
    """TrainingArguments plus `beta` (how close to the reference the policy stays), `loss_type`
    ("sigmoid": DPO, "ipo"), `max_length` and `overlong` as in SFTConfig."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    max_length: int | None = None
    overlong: str = "error"
    learning_rate: float = 5e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ValidationError(f"DPOConfig.beta must be > 0, got {self.beta}.")
        if self.loss_type not in LOSS_TYPES:
            raise ValidationError(f"DPOConfig.loss_type must be one of {', '.join(LOSS_TYPES)}; got {self.loss_type!r}.")


def has_lora(model: torch.nn.Module) -> bool:
    from lmforge.peft.lora import lora_layers

    return bool(lora_layers(model))


class PairwiseTrainer(Trainer):
    """A Trainer whose unit is a preference pair: a batch of B pairs is 2B rows, chosen first
    (PreferenceCollator). Subclasses give `pair_terms(batch, module)` → (per-pair loss, per-pair
    margin, mask of real pairs); the loss is summed over real pairs and normalised by their count."""

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        pairs = batch["labels"].shape[0] // 2
        return int((batch["labels"][:pairs] != IGNORE_INDEX).any(-1).sum())

    def loss_sum(self, batch: dict[str, torch.Tensor], module: torch.nn.Module) -> torch.Tensor:
        losses, _, real = self.pair_terms(batch, module)
        return (losses * real).sum()


class DPOTrainer(PairwiseTrainer):
    """The Trainer with the DPO objective on (prompt, chosen, rejected) rows.

    The reference is the model with LoRA switched off when it has LoRA layers (no copy; after a
    LoRA SFT, merge_and_unload() the SFT adapters first so that the SFT model is the reference),
    else `reference_model` or a frozen deep copy of the model as it is when training starts.
    `evaluate()` reports the loss, preference accuracy (how often the chosen answer earns the
    higher implicit reward) and the mean reward margin.
    """

    def __init__(self, model: torch.nn.Module, args: DPOConfig, train_dataset: Sequence[dict[str, Any]],
                 tokenizer: Tokenizer, eval_dataset: Sequence[dict[str, Any]] | None = None,
                 reference_model: torch.nn.Module | None = None, callbacks: Sequence[TrainerCallback] = ()):
        max_length = args.max_length or model.config.context_length
        train, self.dropped = tokenize_preferences(train_dataset, tokenizer, max_length, args.overlong)
        evaluation = (tokenize_preferences(eval_dataset, tokenizer, max_length, args.overlong)[0]
                      if eval_dataset else None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if reference_model is None and not has_lora(model):
            reference_model = copy.deepcopy(model)
        if reference_model is not None:
            reference_model.eval().requires_grad_(False)
        self.reference_model = reference_model
        super().__init__(model, args, train, PreferenceCollator(pad or 0), eval_dataset=evaluation,
                         task="causal-lm", callbacks=callbacks)

    def _reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if self.reference_model is not None:
                return self._logprobs(batch, self.reference_model)
            from lmforge.peft import lora_disabled

            with lora_disabled(self.model):
                return self._logprobs(batch, None)

    def _logprobs(self, batch: dict[str, torch.Tensor], module: torch.nn.Module | None) -> torch.Tensor:
        """Each row's answer log-probability, computing logits from the first answer on only."""
        labels = batch["labels"].to(self.device)
        start = self.prediction_start(labels)
        return sequence_logprobs(self._forward(batch, module, start), labels[:, start:])

    def pair_terms(self, batch: dict[str, torch.Tensor], module: torch.nn.Module | None = None):
        """(per-pair loss, per-pair reward margin, mask of real pairs) of a batch."""
        labels = batch["labels"].to(self.device)
        policy = self._logprobs(batch, module)
        reference = self._reference_logprobs(batch)
        pairs = labels.shape[0] // 2
        real = (labels[:pairs] != IGNORE_INDEX).any(-1)  # a process's stand-in batch has no target
        losses = dpo_loss(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], self.args.beta,
                          self.args.loss_type)
        margins = self.args.beta * ((policy[:pairs] - reference[:pairs]) - (policy[pairs:] - reference[pairs:]))
        return losses, margins.detach(), real

    def evaluate(self, dataset: Sequence[dict] | None = None) -> dict[str, float]:
        loss, accuracy, margin = evaluate_pairs(self, self.eval_dataset if dataset is None else dataset)
        return {"loss": loss, "preference_accuracy": accuracy, "reward_margin": margin}


@torch.no_grad()
def evaluate_pairs(trainer: Trainer, dataset: Sequence[dict] | None) -> tuple[float, float, float]:
    """(mean loss, fraction of pairs whose margin is positive, mean margin) over a tokenized preference
    set, from `trainer.pair_terms(batch)`; with N processes their sums are added up."""
    if not dataset:
        raise ValidationError("evaluate() needs a non-empty dataset of preference pairs; pass one or set "
                              "eval_dataset.")
    trainer.model.eval()
    totals = {"loss": 0.0, "correct": 0.0, "margin": 0.0, "pairs": 0.0}
    for batch, counted in trainer.evaluation_batches(dataset):
        losses, margins, real = trainer.pair_terms(batch)
        if not counted:
            continue
        totals["loss"] += (losses * real).sum().item()
        totals["correct"] += ((margins > 0) & real).sum().item()
        totals["margin"] += (margins * real).sum().item()
        totals["pairs"] += real.sum().item()
    trainer.model.train()
    totals = {name: all_reduce_sum(value, trainer.context) for name, value in totals.items()}
    pairs = max(totals["pairs"], 1)
    return totals["loss"] / pairs, totals["correct"] / pairs, totals["margin"] / pairs
