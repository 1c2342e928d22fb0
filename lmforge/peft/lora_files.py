"""LoRA adapters on disk in the Hugging Face PEFT layout, readable by `peft` and written by it.

A PEFT adapter folder holds `adapter_config.json` (peft_type "LORA", r, lora_alpha,
target_modules, ...) and `adapter_model.safetensors` with one pair of matrices per
adapted layer, named after the HF model's modules under "base_model.model.":
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` ([r, in]) and
`….lora_B.weight` ([out, r]); fully trained `modules_to_save` are stored whole under
their HF names. Only the adapter is saved: a few MB that apply to the base model
anyone can download.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.errors import CheckpointError, UnsupportedError
from lmforge.peft.lora import LoraConfig, _require_lora, add_lora
from lmforge.registry import registered_task

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "sequence-classification": "SEQ_CLS", "token-classification": "TOKEN_CLS",
              "seq2seq-lm": "SEQ_2_SEQ_LM", "base": "FEATURE_EXTRACTION"}
_FEATURES_WE_LACK = {"use_dora": "DoRA", "use_rslora": "rank-stabilised scaling", "fan_in_fan_out": "Conv1D layout"}


def _keymap(model: nn.Module):
    from lmforge.models.base import PreTrainedModel  # here: lmforge.models imports lmforge.peft

    if not isinstance(model, PreTrainedModel):
        raise UnsupportedError(f"PEFT-format files name layers the HF way, which needs an lmforge model; "
                               f"{type(model).__name__} is not one.")
    if type(model).to_hf_layout.__func__ is not PreTrainedModel.to_hf_layout.__func__:
        raise UnsupportedError(f"{type(model).__name__} stores some weights differently from HF (fused or "
                               "transposed), so its LoRA matrices do not map one-to-one onto HF's layers; use "
                               "merge_and_unload() and save_pretrained() instead.")
    return model.hf_keymap()


def _hf_module(keymap, name: str) -> str:
    return keymap.to_hf(f"{name}.weight").removesuffix(".weight")


def _our_module(keymap, hf_name: str) -> str:
    return keymap.from_hf(f"{hf_name}.weight").removesuffix(".weight")


def save_lora(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write `model`'s LoRA matrices (and modules_to_save) as a PEFT adapter folder."""
    layers, keymap = _require_lora(model), _keymap(model)
    config: LoraConfig = model.lora_config
    tensors, hf_targets = {}, set()
    for name, layer in layers.items():
        hf = _hf_module(keymap, name)
        hf_targets.add(hf.rsplit(".", 1)[-1])
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
    saved_modules = []
    for name in config.modules_to_save:
        saved_modules.append(_hf_module(keymap, name))
        for parameter_name, tensor in model.get_submodule(name).state_dict().items():
            tensors[PREFIX + keymap.to_hf(f"{name}.{parameter_name}")] = tensor.detach().contiguous().cpu()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    description = {
        "peft_type": "LORA", "task_type": TASK_TYPES.get(registered_task(model)), "r": config.r,
        "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "target_modules": sorted(hf_targets), "modules_to_save": saved_modules or None, "bias": "none",
        "fan_in_fan_out": False, "use_dora": False, "use_rslora": False, "init_lora_weights": True,
        "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(description, indent=2) + "\n")
    return folder


def read_peft_config(folder: str | Path) -> dict:
    """The adapter_config.json of a PEFT adapter folder (which must hold the weights file too)."""
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not path.is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{folder}: not a PEFT adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}); "
                              "write one with save_peft_adapter() or peft's save_pretrained().")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}).") from None
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise CheckpointError(f"{path}: has no \"peft_type\"; write the folder again with save_peft_adapter().")
    return config


def _read_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    config = read_peft_config(folder)
    if config.get("peft_type") != "LORA":
        raise UnsupportedError(f"{path}: peft_type {config.get('peft_type')!r}; only LoRA adapters load here.")
    for key, feature in _FEATURES_WE_LACK.items():
        if config.get(key):
            raise UnsupportedError(f"{path}: {key}=true ({feature}) is not supported; train the adapter without it.")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UnsupportedError(f"{path}: per-layer rank_pattern/alpha_pattern are not supported; use one r and "
                               "lora_alpha for all layers.")
    if config.get("bias", "none") != "none":
        raise UnsupportedError(f"{path}: bias={config['bias']!r} (trained biases) is not supported; use bias='none'.")
    return config


def load_lora(model: nn.Module, folder: str | Path) -> list[str]:
    """Add the LoRA layers a PEFT adapter folder describes to `model` and load their matrices;
    returns the adapted layers' names (lmforge's)."""
    folder = Path(folder)
    config, keymap = _read_config(folder), _keymap(model)
    weights = load_file(folder / ADAPTER_WEIGHTS)
    unprefixed = {key.removeprefix(PREFIX): tensor for key, tensor in weights.items()}
    targets = sorted({_our_module(keymap, key.rsplit(".lora_", 1)[0]) for key in unprefixed if ".lora_" in key})
    if not targets:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: holds no lora_A/lora_B matrices.")
    whole = {keymap.from_hf(key): tensor for key, tensor in unprefixed.items() if ".lora_" not in key}
    saved_modules = sorted({key.rsplit(".", 1)[0] for key in whole})  # the modules owning those weights
    names = add_lora(model, LoraConfig(r=int(config["r"]), lora_alpha=float(config["lora_alpha"]),
                                       lora_dropout=float(config.get("lora_dropout") or 0.0),
                                       target_modules=targets, modules_to_save=tuple(saved_modules)))
    with torch.no_grad():
        for name in names:
            layer, hf = model.get_submodule(name), _hf_module(keymap, name)
            for part in ("lora_A", "lora_B"):
                tensor, target = unprefixed[f"{hf}.{part}.weight"], getattr(layer, part).weight
                if tensor.shape != target.shape:
                    raise CheckpointError(f"{folder}: {hf}.{part} has shape {tuple(tensor.shape)}, the model expects "
                                          f"{tuple(target.shape)}; the adapter was trained on another model size.")
                target.copy_(tensor)
        state = model.state_dict()
        for name, tensor in whole.items():
            if name not in state or state[name].shape != tensor.shape:
                raise CheckpointError(f"{folder}: saved module weight {keymap.to_hf(name)!r} does not fit this "
                                      "model; load the adapter onto the base model it was trained on.")
            state[name].copy_(tensor)
    return names
