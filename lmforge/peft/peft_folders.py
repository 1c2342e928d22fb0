"""PEFT adapter folders of every kind lmforge trains: LoRA, prompt tuning and prefix tuning.

A Hugging Face PEFT folder is `adapter_config.json` (its "peft_type" says which method) plus
`adapter_model.safetensors`. LoRA folders are read and written by `lmforge.peft.lora_files`.
Virtual-token folders hold one tensor, `prompt_embeddings`: the soft prompt [P, D] for
PROMPT_TUNING, or for PREFIX_TUNING the flat per-layer keys/values [P, L · 2 · kv_heads · head_dim]
(after the reparameterisation MLP, which is only a training aid). `peft` loads ours onto the HF
model and we load its.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.errors import CheckpointError, UnsupportedError, ValidationError
from lmforge.peft.lora import LoraLayer
from lmforge.peft.lora_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_lora, read_peft_config, save_lora
from lmforge.peft.virtual_tokens import PrefixEncoder, SoftPrompt, VirtualTokensLM, load_virtual_tokens

PROMPT_EMBEDDINGS = "prompt_embeddings"
VIRTUAL_TOKEN_TYPES = (SoftPrompt.peft_type, PrefixEncoder.peft_type)


def save_peft_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write what fine-tuning added to `model` (LoRA layers or virtual tokens) as a PEFT adapter folder."""
    if isinstance(model, VirtualTokensLM):
        return _save_virtual_tokens(model, Path(folder), base_model_name_or_path)
    if any(isinstance(module, LoraLayer) for module in model.modules()):
        return save_lora(model, folder, base_model_name_or_path)
    raise ValidationError(f"{type(model).__name__} has no LoRA layers or virtual tokens to save; save the whole "
                          "model with save_pretrained().")


def _save_virtual_tokens(model: VirtualTokensLM, folder: Path, base_model_name_or_path: str | None) -> Path:
    encoder, config = model.prompt_encoder, model.config
    description = {
        "peft_type": encoder.peft_type, "task_type": "CAUSAL_LM", "num_virtual_tokens": encoder.num_virtual_tokens,
        "num_layers": len(model.decoder_attention_layers()), "num_transformer_submodules": 1,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
    }
    if isinstance(encoder, SoftPrompt):
        description.update(token_dim=config.hidden_size, num_attention_heads=config.num_attention_heads,
                           prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None)
    else:
        description.update(token_dim=encoder.num_kv_heads * encoder.head_dim, num_attention_heads=encoder.num_kv_heads,
                           encoder_hidden_size=encoder.num_kv_heads * encoder.head_dim, prefix_projection=False)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({PROMPT_EMBEDDINGS: encoder.saved_tensor().float().contiguous().cpu()}, folder / ADAPTER_WEIGHTS,
              metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(description, indent=2) + "\n")
    return folder


def peft_type(folder: str | Path) -> str:
    """The method of a PEFT adapter folder ("LORA", "PROMPT_TUNING", "PREFIX_TUNING", ...)."""
    return read_peft_config(folder)["peft_type"]


def load_peft_adapter(model: nn.Module, folder: str | Path) -> str:
    """Apply a PEFT adapter folder (LoRA, prompt or prefix tuning) to `model`, in place; returns its peft_type.

    `model` must be the base model the adapter was trained on.
    """
    kind = peft_type(folder)
    if kind == "LORA":
        load_lora(model, folder)
        return kind
    if kind not in VIRTUAL_TOKEN_TYPES:
        raise UnsupportedError(f"{folder}: peft_type {kind!r} is not supported; lmforge loads LORA, "
                               f"{' and '.join(VIRTUAL_TOKEN_TYPES)} adapters.")
    weights = load_file(Path(folder) / ADAPTER_WEIGHTS)
    if PROMPT_EMBEDDINGS not in weights:
        raise CheckpointError(f"{Path(folder) / ADAPTER_WEIGHTS}: has no {PROMPT_EMBEDDINGS!r} tensor; write the "
                              "folder again with save_peft_adapter() or peft's save_pretrained().")
    load_virtual_tokens(model, kind, weights[PROMPT_EMBEDDINGS])
    return kind
