"""Read GGUF files: typed metadata and a table of (quantized) tensors.

GGUF (llama.cpp's format) is a header of typed key/value metadata, a table of
tensors, then the tensors' bytes, most stored in quantized blocks. `GGUFFile`
parses the header and memory-maps the data; `gguf_dequant` decodes the blocks
to float32 and `gguf_convert` maps the model onto the Hugging Face layout.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.checkpoint.gguf_dequant import (
    QUANT_FORMATS,
    QuantFormat,
    UnsupportedTensorTypeError,
    dequantize,
)
from lmforge.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# --------------------------------------------------------------------------- #
# The file: header, key/value metadata, tensor table, aligned tensor data.
# --------------------------------------------------------------------------- #

# Metadata value types (GGUFValueType): numbers and bools by id as struct codes
# (also valid numpy dtypes with "<"), then strings and arrays.
_NUMBER_TYPES: dict[int, str] = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}
_UINT32, _STRING, _ARRAY, _UINT64 = 4, 8, 9, 10

# ggml tensor type ids (ggml.h); the ones lmforge decodes are in QUANT_FORMATS.
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table: torch shape, storage type and where its bytes start."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int  # absolute byte offset in the file


class _Cursor:
    """Reads little-endian GGUF values from a buffer, failing with CheckpointError past its end."""

    def __init__(self, buffer: mmap.mmap, path: Path) -> None:
        self.buffer, self.path, self.pos = buffer, path, 0

    def take(self, size: int, what: str) -> int:
        """Advance over `size` bytes and return where they start."""
        start = self.pos
        if size < 0 or start + size > len(self.buffer):
            raise CheckpointError(
                f"{self.path} is truncated or corrupt: reading {what} at byte {start} runs past the end "
                f"of the file ({len(self.buffer)} bytes). Download or convert it again."
            )
        self.pos += size
        return start

    def scalar(self, value_type: int, what: str) -> Any:
        fmt = "<" + _NUMBER_TYPES[value_type]
        return struct.unpack_from(fmt, self.buffer, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.scalar(_UINT64, what)
        start = self.take(length, what)
        try:
            return self.buffer[start:start + length].decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(
                f"{self.path}: {what} is not valid UTF-8 text; the file is corrupt. Download or convert it again."
            ) from None

    def value(self, value_type: int, what: str) -> Any:
        """One metadata value: a number, bool, str, or list of those."""
        if value_type in _NUMBER_TYPES:
            return self.scalar(value_type, what)
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            item_type, count = self.scalar(_UINT32, what), self.scalar(_UINT64, what)
            if item_type in _NUMBER_TYPES:  # numbers: one vectorized read
                dtype = np.dtype("<" + _NUMBER_TYPES[item_type])
                start = self.take(count * dtype.itemsize, what)
                return np.frombuffer(self.buffer, dtype, count, start).tolist()
            return [self.value(item_type, what) for _ in range(count)]
        raise CheckpointError(
            f"{self.path}: {what} has unknown value type {value_type}; the file is corrupt or from a "
            "newer GGUF revision. Re-convert it with the llama.cpp version lmforge was tested with."
        )


class GGUFFile:
    """A GGUF file opened for reading: metadata as Python values, tensors on demand.

    The file is memory-mapped; `load_tensor` decodes one tensor to float32, shaped the
    PyTorch way (GGUF lists dimensions fastest-first, so the torch shape is reversed).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._buffer = _map_file(self.path)
        cursor = _Cursor(self._buffer, self.path)
        cursor.take(4, "the magic number")
        self.version: int = cursor.scalar(_UINT32, "the version")
        _check_version(self.path, self.version)
        n_tensors = cursor.scalar(_UINT64, "the tensor count")
        n_metadata = cursor.scalar(_UINT64, "the metadata count")
        self.metadata: dict[str, Any] = {}
        for index in range(n_metadata):
            key = cursor.string(f"metadata key #{index}")
            self.metadata[key] = cursor.value(cursor.scalar(_UINT32, f"the type of {key!r}"), f"metadata {key!r}")
        table = [_read_tensor_info(cursor, index) for index in range(n_tensors)]
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise CheckpointError(f"{self.path}: general.alignment is {alignment!r}, not a power of two; "
                                  "the file is corrupt. Download or convert it again.")
        data_start = -(-cursor.pos // alignment) * alignment
        self._tensors: dict[str, TensorInfo] = {}
        for name, shape, type_name, offset in table:
            if name in self._tensors:
                raise CheckpointError(f"{self.path} lists tensor {name!r} twice; the file is corrupt. "
                                      "Download or convert it again.")
            self._tensors[name] = TensorInfo(name, shape, type_name, data_start + offset)
            self._check_fits(self._tensors[name])

    def __repr__(self) -> str:
        arch = self.metadata.get("general.architecture")
        return f"GGUFFile({str(self.path)!r}, architecture={arch!r}, tensors={len(self._tensors)})"

    @property
    def architecture(self) -> str:
        """The model architecture llama.cpp names in `general.architecture` (e.g. "llama")."""
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(
                f"{self.path} has no general.architecture metadata; it was not written by a "
                "llama.cpp converter for a model, so lmforge cannot tell how to build it."
            )
        return arch

    @property
    def tensor_names(self) -> list[str]:
        """Tensor names in file order (GGUF names, e.g. "blk.0.attn_q.weight")."""
        return list(self._tensors)

    def tensor_type(self, name: str) -> str:
        """The storage type of a tensor, e.g. "Q4_1" or "F32"."""
        return self._info(name).type_name

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """The torch shape of a tensor (GGUF dimensions reversed)."""
        return self._info(name).shape

    def raw_tensor(self, name: str) -> torch.Tensor:
        """A tensor's stored bytes as a flat uint8 tensor (a copy), e.g. for kernels on quantized blocks."""
        info = self._info(name)
        return self._bytes(info, 0, _n_bytes(info.shape, self._format(info)))

    def _format(self, info: TensorInfo) -> QuantFormat:
        fmt = QUANT_FORMATS.get(info.type_name)
        if fmt is None:
            raise UnsupportedTensorTypeError(
                f"{self.path}: tensor {info.name!r} is stored as {info.type_name}, which lmforge cannot decode "
                f"(supported: {', '.join(QUANT_FORMATS)}). Use a GGUF quantized with a supported type."
            )
        return fmt

    def _bytes(self, info: TensorInfo, start: int, count: int) -> torch.Tensor:
        """`count` bytes of a tensor's data from byte `start`, copied out of the mapped file."""
        return torch.from_numpy(np.frombuffer(self._buffer, np.uint8, count, info.offset + start).copy())

    def load_tensor(self, name: str) -> torch.Tensor:
        """Read and dequantize one tensor to float32 in its torch shape."""
        info = self._info(name)
        return dequantize(self.raw_tensor(name), info.type_name, info.shape)

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor (its first torch dimension), dequantized to float32.

        Quantized blocks never span two rows, so only those rows' bytes are read and decoded:
        a tensor-parallel process loads its slice of a matrix without decoding the rest.
        """
        info = self._info(name)
        rows = info.shape[0]
        if not 0 <= start <= stop <= rows:
            raise CheckpointError(f"{self.path}: rows [{start}, {stop}) of tensor {name!r} are out of range; it has "
                                  f"{rows} rows.")
        row_bytes = _n_bytes(info.shape, self._format(info)) // rows
        raw = self._bytes(info, start * row_bytes, (stop - start) * row_bytes)
        return dequantize(raw, info.type_name, (stop - start, *info.shape[1:]))

    def _info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(
                f"{self.path} has no tensor named {name!r}; it has {len(self._tensors)} tensors "
                f"such as {', '.join(list(self._tensors)[:5])}. Check the name against .tensor_names."
            ) from None

    def _check_fits(self, info: TensorInfo) -> None:
        """Fail now, not at load time, if a tensor's bytes run past the end of the file."""
        fmt = QUANT_FORMATS.get(info.type_name)
        if fmt is not None and info.offset + _n_bytes(info.shape, fmt) > len(self._buffer):
            raise CheckpointError(
                f"{self.path} is truncated: tensor {info.name!r} ends at byte "
                f"{info.offset + _n_bytes(info.shape, fmt)} but the file has {len(self._buffer)} bytes. "
                "Download or convert it again."
            )


def _n_bytes(shape: Sequence[int], fmt: QuantFormat) -> int:
    return math.prod(shape) // fmt.block_size * fmt.type_size


def _read_tensor_info(cursor: _Cursor, index: int) -> tuple[str, tuple[int, ...], str, int]:
    """One tensor table entry: name, torch shape, type name, offset from the data section."""
    name = cursor.string(f"the name of tensor #{index}")
    n_dims = cursor.scalar(_UINT32, f"the rank of {name!r}")
    if n_dims > 4:
        raise CheckpointError(f"{cursor.path}: tensor {name!r} claims {n_dims} dimensions (ggml allows 4); "
                              "the file is corrupt. Download or convert it again.")
    dims = [cursor.scalar(_UINT64, f"the shape of {name!r}") for _ in range(n_dims)]
    type_id = cursor.scalar(_UINT32, f"the type of {name!r}")
    offset = cursor.scalar(_UINT64, f"the offset of {name!r}")
    return name, tuple(reversed(dims)), GGML_TYPE_NAMES.get(type_id, f"unknown type {type_id}"), offset


def _map_file(path: Path) -> mmap.mmap:
    """Memory-map `path` read-only after checking that it starts like a GGUF file."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated: it has {len(head)} bytes, less than a GGUF "
                                      "header. Download or convert it again.")
            if head[:4] != GGUF_MAGIC:
                raise CheckpointError(
                    f"{path} is not a GGUF file: it starts with {head[:4]!r} instead of {GGUF_MAGIC!r}. "
                    "Pass a .gguf file (for safetensors checkpoints, use the HF folder loader)."
                )
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise CheckpointError(f"GGUF file not found: {path}. Check the path.") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a GGUF file. Pass the .gguf file inside it.") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read GGUF file {path}: {exc}. Check the path and permissions.") from exc


def _check_version(path: Path, version: int) -> None:
    if version & 0xFFFF == 0 and version:
        raise CheckpointError(f"{path} is a big-endian GGUF file; lmforge reads little-endian ones. "
                              "Convert the model again without --bigendian.")
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{path} is GGUF version {version}; lmforge reads versions {SUPPORTED_VERSIONS}. "
            "Re-convert the model with a current llama.cpp (convert_hf_to_gguf.py)."
        )


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """The parsed GGUF file at `path`, reused while the file is unchanged.

    Loading a model reads one file several times (config to route it, tokenizer, weights);
    parsing a large vocabulary's metadata takes a noticeable fraction of a second, so it is done once.
    """
    try:
        stat = os.stat(path)
    except OSError:
        return GGUFFile(path)  # raises the CheckpointError that names the problem
    return _open_unchanged(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_unchanged(path: str, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)
