"""Auto routing: from a config, folder, GGUF file or short name to the right class.

Architectures register their classes with `@register(model_type, task)`; the
`Auto*` classes look up the model type of whatever they are given (config.json
`model_type`, GGUF `general.architecture`) and the task they stand for. Adding
an architecture is one decorator per class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.errors import UnsupportedError

TASKS = ("base", "causal-lm", "masked-lm", "sequence-classification", "token-classification", "seq2seq-lm")

# model_type → task → model class
MODEL_REGISTRY: dict[str, dict[str, type]] = {}


def register(model_type: str, task: str):
    """Class decorator: make `cls` the `task` model for configs of `model_type`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")

    def decorate(cls: type) -> type:
        MODEL_REGISTRY.setdefault(model_type, {})[task] = cls
        return cls

    return decorate


def registered_task(model: Any) -> str | None:
    """The task `model`'s registered class stands for (LlamaForCausalLM → "causal-lm"); a model whose class
    was extended in place (LoRA layers, virtual tokens) counts as the registered class it extends."""
    registered = {cls: task for tasks in MODEL_REGISTRY.values() for task, cls in tasks.items()}
    return next((registered[cls] for cls in type(model).__mro__ if cls in registered), None)


def _ensure_models_imported() -> None:
    import lmforge.models  # noqa: F401  (importing registers every architecture)


def model_class(model_type: str, task: str) -> type:
    """The class registered for (`model_type`, `task`), or an error listing what exists."""
    _ensure_models_imported()
    if model_type not in MODEL_REGISTRY:
        raise UnsupportedError(
            f"architecture {model_type!r} is not supported; supported architectures: "
            f"{', '.join(sorted(MODEL_REGISTRY))}."
        )
    tasks = MODEL_REGISTRY[model_type]
    if task not in tasks:
        raise UnsupportedError(
            f"architecture {model_type!r} has no {task!r} model; available for it: {', '.join(sorted(tasks))}."
        )
    return tasks[task]


def config_class(model_type: str) -> type:
    return model_class(model_type, "base").config_class


class AutoConfig:
    @staticmethod
    def for_model(model_type: str, **fields: Any):
        """A fresh config of `model_type` with the given fields (e.g. for a tiny random model)."""
        return config_class(model_type).from_dict(fields)

    @staticmethod
    def from_pretrained(ref: str | Path):
        from lmforge.sources import load_config

        config_dict = load_config(ref)
        return config_class(config_dict["model_type"]).from_dict(config_dict)


class _AutoModelBase:
    task: str = "base"

    @classmethod
    def from_config(cls, config, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
        return model_class(config.model_type, cls.task).from_config(config, dtype, attn_implementation)

    @classmethod
    def from_pretrained(cls, ref: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                        **config_overrides: Any):
        """Load a model from an embedded short name, a local HF folder or a GGUF file; `config_overrides`
        replace config fields first (e.g. `num_labels=6` for a new classification head)."""
        from lmforge.sources import load_config

        config_dict = load_config(ref)  # route first, so an unsupported model fails before reading weights
        if "model_type" not in config_dict:
            raise UnsupportedError(f"{ref}: config has no 'model_type'; cannot tell which architecture it is.")
        return model_class(config_dict["model_type"], cls.task).from_pretrained(ref, dtype, attn_implementation,
                                                                                **config_overrides)


class AutoModel(_AutoModelBase):
    task = "base"


class AutoModelForCausalLM(_AutoModelBase):
    task = "causal-lm"


class AutoModelForMaskedLM(_AutoModelBase):
    task = "masked-lm"


class AutoModelForSequenceClassification(_AutoModelBase):
    task = "sequence-classification"


class AutoModelForTokenClassification(_AutoModelBase):
    task = "token-classification"


class AutoModelForSeq2SeqLM(_AutoModelBase):
    task = "seq2seq-lm"


class AutoTokenizer:
    @staticmethod
    def from_pretrained(ref: str | Path):
        from lmforge.tokenizer import Tokenizer

        return Tokenizer.from_pretrained(ref)
