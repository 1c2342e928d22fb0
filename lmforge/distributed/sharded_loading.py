"""Sharded loading: each tensor-parallel process reads only its slices of the checkpoint.

The model is first built as a skeleton whose weights are allocated but never written, so
the operating system never gives them memory. `shard_model` then swaps every split layer for
one holding this process's slice, read straight from the file: safetensors reads a slice of a
tensor without the rest, and a GGUF matrix is decoded row range by row range (its quantized
blocks never span two rows; it keeps every matrix [out, in]). Only the small replicated tensors
(norms) are read whole. So no process ever holds the full model; each holds about 1/N of the
weights, plus what all share.
Layouts that store tensors differently on disk say where each of ours is (GPT-2: q, k and v are
column ranges of the fused Conv1D c_attn, stored [in, out]; row ranges of a GGUF's attn_qkv), so
their slices are read the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from lmforge.checkpoint.gguf import GGUFFile, open_gguf
from lmforge.checkpoint.gguf_convert import ARCHITECTURES, hf_tensor_name, unpermute_qk
from lmforge.checkpoint.hf import INDEX_NAME, WEIGHTS_NAME
from lmforge.distributed.tensor_parallel import shard_model
from lmforge.errors import CheckpointError, UnsupportedError
from lmforge.models.base import PreTrainedModel, skip_weight_init

COLUMN_CHUNK_ROWS = 1024  # rows decoded at a time when a GGUF matrix is sliced by columns


class SafetensorsTensors:
    """Slices of an HF folder's tensors (one file or shards with an index), named the model's way.

    Where the model stores a tensor differently (`PreTrainedModel.stored_tensor`: a part of a fused
    tensor, or transposed), the slice is taken from the stored tensor and turned into ours.
    """

    def __init__(self, folder: Path, model: PreTrainedModel):
        self.folder, self.model = folder, model
        if (folder / WEIGHTS_NAME).is_file():
            with safe_open(folder / WEIGHTS_NAME, framework="pt") as handle:
                self.files = dict.fromkeys(handle.keys(), WEIGHTS_NAME)
        else:
            self.files = json.loads((folder / INDEX_NAME).read_text())["weight_map"]

    def _file_name(self, hf_name: str) -> str:
        """The checkpoint's name for `hf_name`; a bare-backbone checkpoint (GPT-2's) lacks the task prefix."""
        prefix = f"{self.model.hf_prefix}."
        bare = hf_name[len(prefix):] if hf_name.startswith(prefix) else None
        for candidate in (hf_name, bare):
            if candidate in self.files:
                return candidate
        raise CheckpointError(f"{self.folder}: no tensor {hf_name!r}; the checkpoint is for another "
                              "architecture or incomplete.")

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stored = self.model.stored_tensor(name)
        file_name = self._file_name(stored.name)
        with safe_open(self.folder / self.files[file_name], framework="pt") as handle:
            view = handle.get_slice(file_name)
            ours = [slice(None)] * len(view.get_shape())  # the slice in our layout, [out, in]
            if dim is not None:
                ours[dim] = slice(start, stop)
            if stored.rows is not None:  # our rows are a range of the fused tensor's
                first, last = stored.rows
                within = ours[0]
                ours[0] = slice(first + (within.start or 0), first + (last - first if within.stop is None
                                                                       else within.stop))
            tensor = view[tuple(reversed(ours)) if stored.transposed else tuple(ours)]
        return tensor.t().contiguous() if stored.transposed else tensor


class GGUFTensors:
    """Slices of a GGUF file's tensors (an architecture lmforge converts), dequantized and in HF row order.

    GGUF keeps every matrix [out, in], so GPT-2's fused attention is read as row ranges of attn_qkv.
    """

    def __init__(self, gguf_file: GGUFFile, model: PreTrainedModel):
        self.file, self.model = gguf_file, model
        self.head_dim = model.decoder_attention_layers()[0].head_dim
        table = ARCHITECTURES[gguf_file.architecture].tensor_names
        self.names = {hf_tensor_name(name, table): name for name in gguf_file.tensor_names}
        self.llama = gguf_file.architecture == "llama"

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stored = self.model.stored_tensor(name)
        gguf_name = self.names.get(stored.name)
        if gguf_name is None:
            raise CheckpointError(f"{self.file.path}: no tensor for {name}; the file does not hold every weight "
                                  "this model needs.")
        shape = self.file.tensor_shape(gguf_name)
        first, last = stored.rows or (0, shape[0])
        if dim == 0:
            first, last = first + start, first + (last - first if stop is None else stop)
        whole_rows = (first, last) == (0, shape[0])
        if len(shape) == 2 and dim == 1:  # a column slice: decode a chunk of whole rows at a time, keep the columns
            tensor = torch.cat([self.file.load_rows(gguf_name, r, min(r + COLUMN_CHUNK_ROWS, last))[:, start:stop]
                                for r in range(first, last, COLUMN_CHUNK_ROWS)])
        elif len(shape) == 2 and not whole_rows:
            tensor = self.file.load_rows(gguf_name, first, last)
        else:
            tensor = self.file.load_tensor(gguf_name)
            tensor = tensor if whole_rows else tensor[first:last]
        if self.llama and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            # llama.cpp interleaves each head's rotary halves; whole heads undo it on their own
            tensor = unpermute_qk(tensor, tensor.shape[0] // self.head_dim)
        return tensor


def _tensor_source(path: Path, model: PreTrainedModel):
    """A slice reader for the checkpoint at `path`, or None when its layout must be loaded whole."""
    rewritten = type(model).from_hf_layout.__func__ is not PreTrainedModel.from_hf_layout.__func__
    if rewritten and type(model).stored_tensor is PreTrainedModel.stored_tensor:
        return None  # stored differently on disk, and the model does not say where its slices are
    if path.is_file():
        gguf_file = open_gguf(path)
        return GGUFTensors(gguf_file, model) if gguf_file.architecture in ARCHITECTURES else None
    return SafetensorsTensors(path, model)


def load_tensor_parallel(ref: str | Path, rank: int, world_size: int, group: dist.ProcessGroup | None = None,
                         dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> nn.Module:
    """Process `rank`'s shard of a causal LM (embedded name, HF folder or GGUF file), read slice by slice.

    Every process of `group` calls it with its own rank. Checks the split before reading any weight.
    """
    from lmforge.peft.adapters import ADAPTERS_KEY
    from lmforge.quant.checkpoint import QUANTIZATION_KEY
    from lmforge.registry import model_class
    from lmforge.sources import load_config, resolve

    path = resolve(ref)
    config_dict = load_config(path)
    for key in (QUANTIZATION_KEY, ADAPTERS_KEY):
        if key in config_dict:
            raise UnsupportedError(f"{path} holds a model with {key}; tensor parallelism splits plain float "
                                   "models, so load one saved without them.")
    cls = model_class(config_dict["model_type"], "causal-lm")
    with skip_weight_init():  # memory nobody writes is never made resident
        model = cls.from_config(cls.config_class.from_dict(config_dict))
    source = _tensor_source(path, model)
    if source is None:
        model = cls.from_pretrained(ref)
        shard_model(model, rank, world_size, group)
    else:
        split = shard_model(model, rank, world_size, group, source)
        _load_replicated(model, source, split)
    return model.to(device=device, dtype=dtype).eval()


def _load_replicated(model: PreTrainedModel, source, split: list[str]) -> None:
    """Fill the weights every process holds whole (norms, position tables) from the checkpoint."""
    tied = model.tied_weights if getattr(model.config, "tie_word_embeddings", False) else {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.rpartition(".")[0] not in split and name not in tied:
                tensor.copy_(source.read(name))
    model.tie_weights()
