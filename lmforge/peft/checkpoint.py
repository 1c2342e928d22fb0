"""Adapter-only folders: keep just what fine-tuning changed, next to a reference to the base model.

An adapted model saves in two ways. `save_pretrained` writes a complete model folder (the
config.json "adapters" block tells `from_pretrained` to rebuild the adapters before loading). Or
`save_adapters` writes only the trained tensors — the adapters and the task head, a few percent
of the model — to `adapter_model.safetensors` and, in `adapter_config.json`, where they go and
which base model they extend; `load_adapters` rebuilds the whole model from the base and them.
Adapters cannot be merged into the base weights: unlike LoRA's, their update is not linear.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.errors import CheckpointError, ValidationError
from lmforge.peft.adapters import (
    ADAPTERS_KEY,
    adapter_parameter_names,
    read_adapter_block,
)
from lmforge.peft.freezing import head_parameter_names

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT_VERSION = 1
LABEL_FIELDS = ("id2label", "label2id")


def save_adapters(model: nn.Module, folder: str | Path, base_model: str | None = None) -> Path:
    """Write the adapters and task head of `model` to `folder`; `base_model` names what they extend
    (an embedded short name or a folder), so `load_adapters(folder)` needs nothing else."""
    config = getattr(model, "config", None)
    block = getattr(config, "extra", {}).get(ADAPTERS_KEY)
    if block is None:
        raise ValidationError(f"{type(model).__name__} has no adapters to save; add them first with add_adapters "
                              "(or the 'adapter' method), or save the whole model with save_pretrained.")
    names = adapter_parameter_names(model) + head_parameter_names(model)
    parameters, keymap = dict(model.named_parameters()), model.hf_keymap()
    tensors = model.to_hf_layout({keymap.to_hf(name): parameters[name].detach().cpu().contiguous() for name in names})
    record = {
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "model_type": config.model_type,
        "architectures": [model.hf_architecture],
        "num_labels": config.num_labels,
        **{name: config.extra[name] for name in LABEL_FIELDS if name in config.extra},
        ADAPTERS_KEY: block,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return folder


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """The checked adapter_config.json of an adapter folder."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG}; pass a folder written by save_adapters.")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); write it again with save_adapters.") from exc
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: expected an object with format_version {FORMAT_VERSION}; write it again "
                              "with save_adapters.")
    read_adapter_block(record.get(ADAPTERS_KEY), str(path))
    return record


def load_adapters(folder: str | Path, base_model: str | Path | None = None, dtype: torch.dtype = torch.float32,
                  attn_implementation: str = "sdpa") -> nn.Module:
    """The base model with the saved adapters and head of `folder`, ready for inference (eval mode).

    `base_model` overrides the one adapter_config.json names; it must be the model the adapters
    were trained on, since they only make sense on top of its weights.
    """
    from lmforge.registry import MODEL_REGISTRY, model_class
    from lmforge.sources import load_checkpoint

    record = read_adapter_config(folder)
    base_model = base_model or record.get("base_model")
    if base_model is None:
        raise ValidationError(f"{folder}: {ADAPTER_CONFIG} names no base model; pass base_model=, the model the "
                              "adapters were trained on.")
    model_type, architecture = record.get("model_type"), (record.get("architectures") or [None])[0]
    model_class(model_type, "base")  # an unknown architecture fails here, with the list of supported ones
    cls = next((c for c in MODEL_REGISTRY[model_type].values() if c.hf_architecture == architecture), None)
    if cls is None:
        raise CheckpointError(f"{folder}: architecture {architecture!r} is not a {model_type} model lmforge has; "
                              "write the folder again with save_adapters.")
    config, state, _ = load_checkpoint(base_model)
    if config.get("model_type") != model_type:
        raise ValidationError(f"{folder}: the adapters were trained on a {model_type} model, but {base_model} is a "
                              f"{config.get('model_type')} model; pass the base model they were trained on.")
    prefix = f"{cls.hf_prefix}."
    if not any(name.startswith(prefix) for name in state):  # a bare backbone checkpoint, nested as the task model's
        state = {prefix + name: tensor for name, tensor in state.items()}
    try:
        state.update(load_file(str(Path(folder) / ADAPTER_WEIGHTS)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{Path(folder) / ADAPTER_WEIGHTS}: cannot read it ({exc}); write the folder again "
                              "with save_adapters.") from exc
    overrides = {name: record[name] for name in ("num_labels", *LABEL_FIELDS, ADAPTERS_KEY) if name in record}
    config = {**config, **overrides, "architectures": [architecture]}
    return cls.from_hf_state_dict(config, state, f"{base_model} + {folder}", dtype, attn_implementation)
