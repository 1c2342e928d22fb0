"""Write GGUF files: typed metadata, a tensor table, then aligned tensor data.

The inverse of `gguf.GGUFFile`. Everything is little-endian: the magic "GGUF", version 3,
the tensor and metadata counts (uint64); each metadata entry as a key, a value type id and
the value (a string is a uint64 byte length plus UTF-8 bytes; an array is an item type, a
uint64 count and the items); each tensor's name, rank, dimensions fastest-varying first (the
reverse of the torch shape), storage type and data offset; then, from the next multiple of
`general.alignment` bytes, the tensors' bytes, each starting at an aligned offset.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lmforge.checkpoint.gguf import GGML_TYPE_NAMES, GGUF_MAGIC
from lmforge.checkpoint.gguf_quant import stored_bytes
from lmforge.errors import CheckpointError

GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32
GGML_TYPE_IDS: dict[str, int] = {name: type_id for type_id, name in GGML_TYPE_NAMES.items()}


class ValueType(IntEnum):
    """Metadata value types (GGUFValueType), by their id in the file."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct / numpy codes of the fixed-size value types ("<" + code is little-endian).
_NUMBER_CODES: dict[ValueType, str] = {
    ValueType.UINT8: "B", ValueType.INT8: "b", ValueType.UINT16: "H", ValueType.INT16: "h",
    ValueType.UINT32: "I", ValueType.INT32: "i", ValueType.FLOAT32: "f", ValueType.BOOL: "?",
    ValueType.UINT64: "Q", ValueType.INT64: "q", ValueType.FLOAT64: "d",
}


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _value(key: str, value: Any, value_type: ValueType, item_type: ValueType | None) -> bytes:
    """The bytes of one metadata value (without its type id, except inside arrays)."""
    if value_type in _NUMBER_CODES:
        try:
            return struct.pack("<" + _NUMBER_CODES[value_type], value)
        except struct.error as exc:
            raise ValueError(f"metadata {key!r}: {value!r} is not a {value_type.name} ({exc}).") from None
    if value_type == ValueType.STRING:
        return _string(value)
    if value_type == ValueType.ARRAY:
        if item_type is None or item_type == ValueType.ARRAY:
            raise ValueError(f"metadata {key!r}: an array needs item_type, a number type, BOOL or STRING.")
        head = struct.pack("<IQ", item_type, len(value))
        if item_type == ValueType.STRING:
            return head + b"".join(_string(item) for item in value)
        try:
            return head + np.asarray(value, dtype="<" + _NUMBER_CODES[item_type]).tobytes()
        except OverflowError as exc:
            raise ValueError(f"metadata {key!r}: an item does not fit {item_type.name} ({exc}).") from None
    raise ValueError(f"metadata {key!r}: unknown value type {value_type!r}.")


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its name, torch shape, storage type and how to produce its bytes."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    encode: Callable[[], torch.Tensor]  # -> the stored bytes as a flat uint8 tensor

    @property
    def nbytes(self) -> int:
        return stored_bytes(self.shape, self.type_name)


class GGUFWriter:
    """Collects metadata and tensors, then writes the whole file in one pass.

    Tensors are encoded one at a time while the file is written, so only one of them
    is ever held in its stored form. The file appears at its path only once complete.
    """

    def __init__(self, alignment: int = DEFAULT_ALIGNMENT) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}.")
        self.alignment = alignment
        self._metadata: dict[str, bytes] = {}
        self._tensors: dict[str, PlannedTensor] = {}

    def add(self, key: str, value: Any, value_type: ValueType, item_type: ValueType | None = None) -> None:
        """Add one metadata entry, e.g. `add("llama.block_count", 30, ValueType.UINT32)` or
        `add("tokenizer.ggml.tokens", tokens, ValueType.ARRAY, ValueType.STRING)`."""
        if key in self._metadata:
            raise ValueError(f"metadata {key!r} was added twice; add each key once.")
        self._metadata[key] = _string(key) + struct.pack("<I", value_type) + _value(key, value, value_type, item_type)

    def add_tensor(self, name: str, shape: Sequence[int], type_name: str,
                   encode: Callable[[], torch.Tensor]) -> None:
        """Plan a tensor of torch `shape` stored as `type_name`; `encode()` is called while writing."""
        if name in self._tensors:
            raise ValueError(f"tensor {name!r} was added twice; add each tensor once.")
        if type_name not in GGML_TYPE_IDS:
            raise ValueError(f"tensor {name!r}: unknown ggml type {type_name!r}.")
        self._tensors[name] = PlannedTensor(name, tuple(int(size) for size in shape), type_name, encode)

    @property
    def tensors(self) -> list[PlannedTensor]:
        return list(self._tensors.values())

    def _aligned(self, size: int) -> int:
        return -(-size // self.alignment) * self.alignment

    def header(self) -> bytes:
        """Everything before the tensor data: counts, metadata and the tensor table, padded to alignment."""
        metadata = dict(self._metadata)
        if "general.alignment" not in metadata:
            metadata["general.alignment"] = (_string("general.alignment") + struct.pack("<I", ValueType.UINT32)
                                             + struct.pack("<I", self.alignment))
        parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(self._tensors), len(metadata)),
                 *metadata.values()]
        offset = 0
        for tensor in self._tensors.values():
            dims = tensor.shape[::-1] or (1,)
            parts += [_string(tensor.name), struct.pack(f"<I{len(dims)}Q", len(dims), *dims),
                      struct.pack("<IQ", GGML_TYPE_IDS[tensor.type_name], offset)]
            offset += self._aligned(tensor.nbytes)
        head = b"".join(parts)
        return head + bytes(self._aligned(len(head)) - len(head))

    def write(self, path: str | os.PathLike[str], progress: bool = False, description: str = "GGUF") -> int:
        """Write the file to `path` (through a temporary file renamed at the end); return its size in bytes.

        If anything fails, or the run is interrupted, the temporary file is removed and
        an existing file at `path` is left as it was.
        """
        path = Path(path)
        if path.is_dir():
            raise CheckpointError(f"{path} is a folder; pass a file name such as {path / 'model.gguf'}.")
        partial = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as file:
                file.write(self.header())
                for tensor in tqdm(self.tensors, desc=description, unit="tensor", disable=not progress):
                    data = tensor.encode()
                    if data.dtype != torch.uint8 or data.numel() != tensor.nbytes:
                        raise RuntimeError(f"tensor {tensor.name!r} encoded to {data.numel()} {data.dtype} values "
                                           f"instead of {tensor.nbytes} bytes of {tensor.type_name}.")
                    file.write(data.contiguous().numpy())
                    file.write(bytes(self._aligned(tensor.nbytes) - tensor.nbytes))
            os.replace(partial, path)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise CheckpointError(f"cannot write {path}: {exc}. Check the free disk space and that the "
                                  "folder is writable.") from exc
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return path.stat().st_size
