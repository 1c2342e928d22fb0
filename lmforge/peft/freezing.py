"""Classic fine-tuning methods: which parameters of a pretrained model learn and which stay as loaded.

- full: every parameter trains. The most capacity, and the most memory: each trained weight
  also needs a gradient and AdamW's two moments.
- frozen (feature extraction): the backbone is fixed and only the new task head trains, on the
  features the pretrained model already computes.
- partial: the embeddings and the first k layers are frozen, the upper layers and the head train.
  Lower layers hold general features (word pieces, syntax), upper ones the task-specific ones.
- adapter: the backbone is frozen; small bottleneck adapters (`lmforge.peft.adapters`) and the head train.

Freezing sets `requires_grad=False`: autograd computes no gradient for the parameter and the
optimizer (`lmforge.train.optim`) leaves it out, so it stays bit for bit as it was loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lmforge.errors import ValidationError
from lmforge.peft.adapters import adapter_parameter_names, add_adapters

METHODS = ("full", "frozen", "partial", "adapter")
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_\w+|shared)\.")  # token, position, segment embeddings and their norm
_LAYER = re.compile(r"^((?:.*\.)?)layers\.(\d+)\.")  # (the stack, the layer number): BART has an encoder and a decoder stack


@dataclass(frozen=True)
class TrainableSummary:
    """How many parameters train, out of how many (a tied weight counts once)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Trainable and total parameter counts of `model` (print it for PEFT's one-line summary)."""
    parameters = list(model.parameters())  # parameters() lists a tied weight once
    return TrainableSummary(sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters))


def train_only(model: nn.Module, keep: Callable[[str], bool]) -> list[str]:
    """Make exactly the parameters whose name `keep` accepts trainable; return their names."""
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(keep(name))
        if parameter.requires_grad:
            trainable.append(name)
    return trainable


def head_parameter_names(model: nn.Module) -> list[str]:
    """The task head's parameters: a task model keeps its pretrained backbone as `model.model`, the head is the
    rest (`classifier`, `score`, `classification_head`, …). A bare backbone has none."""
    if not isinstance(getattr(model, "model", None), nn.Module):
        return []
    return [name for name, _ in model.named_parameters() if not name.startswith("model.")]


def _require_head(model: nn.Module, method: str) -> set[str]:
    head = set(head_parameter_names(model))
    if not head:
        raise ValidationError(f"{type(model).__name__} has no task head to train with method {method!r}; load a task "
                              "model such as AutoModelForSequenceClassification.")
    return head


def full_finetuning(model: nn.Module) -> list[str]:
    """Every parameter trains."""
    return train_only(model, lambda name: True)


def feature_extraction(model: nn.Module) -> list[str]:
    """The backbone is frozen; only the task head trains (the "frozen" method)."""
    head = _require_head(model, "frozen")
    return train_only(model, head.__contains__)


def layer_counts(model: nn.Module) -> dict[str, int]:
    """Number of transformer layers per stack ("model." for one stack; "model.encoder." and "model.decoder." for BART)."""
    counts: dict[str, int] = {}
    for name, _ in model.named_parameters():
        match = _LAYER.match(name)
        if match:
            counts[match[1]] = max(counts.get(match[1], 0), int(match[2]) + 1)
    return counts


def partial_finetuning(model: nn.Module, freeze_layers: int) -> list[str]:
    """Freeze the embeddings and the first `freeze_layers` layers (of each stack); the rest trains."""
    counts = layer_counts(model)
    most = max(counts.values(), default=0)
    if isinstance(freeze_layers, bool) or not isinstance(freeze_layers, int) or not 0 <= freeze_layers <= most:
        raise ValidationError(f"freeze_layers must be an integer from 0 to {most} (the layers of "
                              f"{type(model).__name__}); got {freeze_layers!r}.")

    def keep(name: str) -> bool:
        layer = _LAYER.match(name)
        return not _EMBEDDING.search(name) and not (layer and int(layer[2]) < freeze_layers)

    return train_only(model, keep)


def adapter_tuning(model: nn.Module, bottleneck: int = 64, where: str = "both") -> list[str]:
    """Add bottleneck adapters (see `add_adapters`) and train only them and the task head, if any."""
    add_adapters(model, bottleneck, where)
    keep = set(adapter_parameter_names(model)) | set(head_parameter_names(model))
    return train_only(model, keep.__contains__)


def apply_method(model: nn.Module, method: str, freeze_layers: int | None = None, bottleneck: int | None = None,
                 where: str | None = None) -> list[str]:
    """Prepare `model` for fine-tuning with `method` (one of METHODS); returns the trainable parameter names.

    `freeze_layers` is the partial method's k; `bottleneck` (default 64) and `where` (default "both")
    shape the adapter method's adapters. An option another method would ignore is an error.
    """
    if method not in METHODS:
        raise ValidationError(f"unknown fine-tuning method {method!r}; use one of: {', '.join(METHODS)}.")
    given = {"freeze_layers": freeze_layers, "bottleneck": bottleneck, "where": where}
    allowed = {"partial": {"freeze_layers"}, "adapter": {"bottleneck", "where"}}.get(method, set())
    stray = [name for name, value in given.items() if value is not None and name not in allowed]
    if stray:
        raise ValidationError(f"option {stray[0]} does not apply to method {method!r}: freeze_layers is for "
                              "'partial', bottleneck and where are for 'adapter'; leave it out.")
    if method == "full":
        return full_finetuning(model)
    if method == "frozen":
        return feature_extraction(model)
    if method == "partial":
        if freeze_layers is None:
            raise ValidationError(f"method 'partial' needs freeze_layers: how many of the "
                                  f"{max(layer_counts(model).values(), default=0)} layers to freeze.")
        return partial_finetuning(model, freeze_layers)
    return adapter_tuning(model, 64 if bottleneck is None else bottleneck, where or "both")
