"""Hugging Face checkpoint layout: `model.safetensors` (or shards + index) in a folder.

This is the interchange format every tool reads. Weights are safetensors only:
pickle-based `pytorch_model.bin` files can run code when loaded, so lmforge
refuses them and says how to convert.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import CheckpointError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file ({exc}); it is truncated or corrupt — "
                              "re-download or re-save it.") from exc


def load_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of an HF-layout folder (single file or sharded with an index)."""
    folder = Path(folder)
    if (folder / WEIGHTS_NAME).is_file():
        return _load_safetensors(folder / WEIGHTS_NAME)
    if (folder / INDEX_NAME).is_file():
        try:
            weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{folder / INDEX_NAME}: malformed shard index ({exc}); it needs a "
                                  "'weight_map' object from tensor name to shard file.") from exc
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise CheckpointError(f"{folder / shard}: shard listed in {INDEX_NAME} is missing.")
            state.update(_load_safetensors(folder / shard))
        missing = set(weight_map) - set(state)
        if missing:
            raise CheckpointError(f"{folder}: tensors listed in {INDEX_NAME} are missing from the shards: "
                                  f"{sorted(missing)[:5]}")
        return state
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(
            f"{folder}: only pickle weights (*.bin/*.pt) found. lmforge loads safetensors only, because "
            "unpickling can run arbitrary code. Convert once with transformers: "
            "`AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)`."
        )
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME} found; is this a model folder?")


def save_hf_weights(state: dict[str, torch.Tensor], folder: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write tensors as one safetensors file, or as shards plus an index when larger than `max_shard_bytes`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_NAME), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / filename), metadata=metadata)
        weight_map.update({name: filename for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
