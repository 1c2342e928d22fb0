"""Hugging Face checkpoint layout: `model.safetensors` (or shards + index) in a folder.

This is the interchange format every tool reads. Weights are safetensors only:
pickle-based `pytorch_model.bin` files can run code when loaded, so lmforge
refuses them and says how to convert.
"""

from __future__ import annotations

import json
from collections.abc import Callable
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


def _weight_files(folder: Path) -> tuple[list[Path], set[str] | None]:
    """The safetensors files of an HF-layout folder, and the tensor names a shard index promises (None: one file)."""
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME], None
    if (folder / INDEX_NAME).is_file():
        try:
            weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{folder / INDEX_NAME}: malformed shard index ({exc}); it needs a "
                                  "'weight_map' object from tensor name to shard file.") from exc
        shards = [folder / shard for shard in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard listed in {INDEX_NAME} is missing.")
        return shards, set(weight_map)
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(
            f"{folder}: only pickle weights (*.bin/*.pt) found. lmforge loads safetensors only, because "
            "unpickling can run arbitrary code. Convert once with transformers: "
            "`AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)`."
        )
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME} found; is this a model folder?")


def _check_complete(folder: Path, promised: set[str] | None, names) -> None:
    missing = (promised or set()) - set(names)
    if missing:
        raise CheckpointError(f"{folder}: tensors listed in {INDEX_NAME} are missing from the shards: "
                              f"{sorted(missing)[:5]}")


def load_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of an HF-layout folder (single file or sharded with an index)."""
    folder = Path(folder)
    files, promised = _weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(_load_safetensors(path))
    _check_complete(folder, promised, state)
    return state


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def _safetensors_index(path: Path) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """Each tensor of a safetensors file: dtype, shape, and the byte range of its data in the file."""
    try:
        with open(path, "rb") as file:
            header_size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(header_size))
        return {name: (SAFETENSORS_DTYPES[info["dtype"]], info["shape"], 8 + header_size + info["data_offsets"][0],
                       8 + header_size + info["data_offsets"][1])
                for name, info in header.items() if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot read the safetensors header ({exc!r}); the file is truncated or "
                              "corrupt — re-download or re-save it.") from exc


def hf_tensor_reader(folder: str | Path) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """The tensor names of an HF-layout folder and a function reading one of them on demand into fresh memory:
    a loader that quantizes layer by layer then never holds the whole float model (nor maps the file: mapped
    pages of a read file would stay in the process's resident memory)."""
    folder = Path(folder)
    files, promised = _weight_files(folder)
    where = {name: (path, *entry) for path in files for name, entry in _safetensors_index(path).items()}
    _check_complete(folder, promised, where)

    def read(name: str) -> torch.Tensor:
        path, dtype, shape, start, stop = where[name]
        data = bytearray(stop - start)
        with open(path, "rb") as file:
            file.seek(start)
            if file.readinto(data) != len(data):
                raise CheckpointError(f"{path}: tensor {name!r} ends past the end of the file; it is truncated — "
                                      "re-download or re-save it.")
        return torch.frombuffer(data, dtype=dtype).reshape(shape) if data else torch.empty(shape, dtype=dtype)

    return list(where), read


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
