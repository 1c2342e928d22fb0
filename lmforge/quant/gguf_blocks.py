"""Keep a GGUF file's own 4- and 8-bit blocks instead of dequantizing them.

llama.cpp's simplest block formats are exactly lmforge's int4 and int8 formats with groups of 32:

- Q8_0 (34 bytes per 32 weights): fp16 d, 32 int8 q; w = d * q → int8, group_size 32, scale d.
- Q4_1 (20 bytes): fp16 d, fp16 m, 16 bytes of codes; w = d * q + m → int4, scale d, offset m.
- Q4_0 (18 bytes): fp16 d, 16 bytes of codes; w = d * (q - 8) → int4, scale d, offset -8 d.

The codes are already packed in the order lmforge uses (byte j of a run: weight j low, j + 16 high)
and fp16 widens to float32 exactly, so nothing is rounded: the quantized model computes with the
very weights llama.cpp computes with, in about the same memory (a tied token embedding looks its
rows up in the head's blocks). llama.cpp's rotary row order of q/k is undone by moving whole rows,
which is exact too.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.checkpoint.gguf import GGUFFile
from lmforge.checkpoint.gguf_convert import ARCHITECTURES, hf_tensor_name
from lmforge.errors import CheckpointError, ConfigError, UnsupportedError
from lmforge.quant.apply import _return_freed_memory
from lmforge.quant.embedding import QuantizedEmbedding, tied_modules, use_quantized_head
from lmforge.quant.formats import Int4Weight, Int8Weight, QuantizedWeight
from lmforge.quant.linear import QuantizedLinear

BLOCK = 32
GGUF_BLOCK_TYPES = ("Q8_0", "Q4_1", "Q4_0")


def _fp16(field: torch.Tensor, rows: int) -> torch.Tensor:
    return field.contiguous().view(torch.float16).float().view(rows, -1)


def gguf_weight(gguf_file: GGUFFile, name: str) -> QuantizedWeight | None:
    """The tensor's blocks as an lmforge quantized weight, or None when its type has no exact mapping."""
    kind = gguf_file.tensor_type(name)
    shape = gguf_file.tensor_shape(name)
    if kind not in GGUF_BLOCK_TYPES or len(shape) != 2:
        return None
    rows, cols = shape
    raw = gguf_file.raw_tensor(name)
    blocks = raw.view(rows * cols // BLOCK, raw.numel() * BLOCK // (rows * cols))
    if kind == "Q8_0":
        q = blocks[:, 2:].contiguous().view(torch.int8).view(rows, cols)
        return Int8Weight(q, _fp16(blocks[:, :2], rows), BLOCK)
    scale = _fp16(blocks[:, :2], rows)
    if kind == "Q4_1":
        offset, codes = _fp16(blocks[:, 2:4], rows), blocks[:, 4:]
    else:
        offset, codes = -8 * scale, blocks[:, 2:]
    return Int4Weight(codes.contiguous().view(rows, cols // 2), scale, offset, BLOCK)


def _reorder_rows(weight: QuantizedWeight, reorder) -> QuantizedWeight:
    """Apply a row permutation (a function of a [rows, ...] tensor) to every per-row tensor of the weight."""
    fields = {name: reorder(tensor) for name, tensor in weight.tensors().items()}
    return type(weight)(**fields, **weight.settings())


def use_gguf_blocks(model: nn.Module, gguf_file: GGUFFile) -> list[str]:
    """Replace each Linear whose GGUF weight is Q8_0, Q4_1 or Q4_0 by a QuantizedLinear over the file's own
    blocks; returns the replaced module names. Other tensors keep the floating-point values already loaded,
    except a token embedding tied to a replaced head, which then reads the head's blocks."""
    if any(isinstance(module, QuantizedLinear) for module in model.modules()):
        raise ConfigError("this model is already quantized; load the GGUF file again to keep its own blocks.")
    if gguf_file.architecture != "llama":
        raise UnsupportedError(f"{gguf_file.path}: keeping GGUF blocks is supported for llama-architecture files, "
                               f"not {gguf_file.architecture!r}; quantize it with 'int8', 'int4' or 'nf4' instead.")
    arch = ARCHITECTURES["llama"]
    config = arch.config(gguf_file)
    keymap = type(model).hf_keymap()
    gguf_names = {}  # our module name → its GGUF tensor
    for name in gguf_file.tensor_names:
        hf_name = hf_tensor_name(name, arch.tensor_names)
        if hf_name is not None and hf_name.endswith(".weight"):
            gguf_names[keymap.from_hf(hf_name).removesuffix(".weight")] = name
    tied = {head: embedding for head, embedding in tied_modules(model).items() if embedding in gguf_names}
    for head, embedding in tied.items():  # a head tied to the token embedding reads its blocks, as in llama.cpp
        gguf_names.setdefault(head, gguf_names[embedding])
    replaced = []
    for module_name, name in gguf_names.items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue  # e.g. a GGUF tensor this model builds differently
        if type(module) is not nn.Linear:
            continue  # the token embedding (tied or not) stays as loaded
        weight = gguf_weight(gguf_file, name)
        if weight is None:
            continue
        if tuple(weight.shape) != tuple(module.weight.shape):
            raise ConfigError(f"GGUF tensor {name!r} has shape {tuple(weight.shape)}, but {module_name} expects "
                              f"{tuple(module.weight.shape)}; the file does not match the model built from it.")
        weight = _reorder_rows(weight, lambda tensor, name=name: arch.fix_weight(name, tensor, config))
        model.set_submodule(module_name, QuantizedLinear(weight, module.bias))
        replaced.append(module_name)
    for head in tied:
        if head in replaced:  # the token lookups read the head's rows too: no float copy of the table
            use_quantized_head(model, head, model.get_submodule(head))
    return replaced


def _skeleton(path, dtype: torch.dtype) -> tuple[GGUFFile, dict, nn.Module]:
    """The open GGUF file, its HF config and the causal LM it describes, built without touching the weights'
    memory (memory no one writes is never made resident)."""
    from lmforge.checkpoint.gguf import open_gguf
    from lmforge.checkpoint.gguf_convert import gguf_config
    from lmforge.models.base import skip_weight_init
    from lmforge.registry import model_class

    gguf_file = open_gguf(path)
    config = gguf_config(gguf_file)
    cls = model_class(config["model_type"], "causal-lm")
    with skip_weight_init():
        model = cls.from_config(cls.config_class.from_dict(config), dtype)
    return gguf_file, config, model


def load_with_gguf_blocks(ref, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM built straight from a GGUF file, its Q8_0/Q4_1/Q4_0 blocks kept as they are.

    Unlike loading in float and then calling `use_gguf_blocks`, no block tensor is ever dequantized: the
    model skeleton is built without touching its memory, the quantized layers take the file's blocks, and
    only the remaining tensors (norms, untied embeddings) are read as floats — so loading peaks near the
    memory the model keeps, as in llama.cpp.
    """
    from lmforge.sources import is_gguf, resolve

    path = resolve(ref)
    if not is_gguf(path):
        raise ConfigError(f"quantization 'gguf' keeps a GGUF file's own 4-/8-bit blocks, but {ref} is not a GGUF "
                          "file; use 'int8', 'int4' or 'nf4' to quantize it.")
    gguf_file, config, model = _skeleton(path, dtype)
    replaced = set(use_gguf_blocks(model, gguf_file))
    arch, keymap = ARCHITECTURES["llama"], type(model).hf_keymap()
    filled = set()
    with torch.no_grad():
        for name in gguf_file.tensor_names:
            ours = keymap.from_hf(hf_tensor_name(name, arch.tensor_names) or name)
            module_name, _, attr = ours.rpartition(".")
            module = model.get_submodule(module_name)
            if (attr == "weight" and module_name in replaced) or isinstance(module, QuantizedEmbedding):
                continue  # already holds the file's blocks
            target = getattr(module, attr)
            target.copy_(arch.fix_weight(name, gguf_file.load_tensor(name), config).view_as(target))
            filled.add(ours)
    missing = [n for n, _ in model.named_parameters() if n not in filled and n.rpartition(".")[0] not in replaced
               and n not in getattr(model, "tied_weights", {})]
    if missing:
        raise CheckpointError(f"{path}: no tensor for {', '.join(missing[:5])}; the file does not hold every "
                              "weight this model needs.")
    _return_freed_memory()  # the blocks' row-layout copies, freed as each layer took its tiles
    return model.eval()


def quantize_while_loading_gguf(ref, method: str, dtype: torch.dtype = torch.float32) -> nn.Module | None:
    """A causal LM from a GGUF file, its Linear layers quantized with `method` as the file is read: each layer's
    weight is decoded to float, quantized and dropped before the next, so loading peaks near the memory of the
    quantized model plus one float matrix (and the token embedding, which a tied head is quantized from) instead
    of the whole float model. None for an architecture whose tensors need rewriting across names (the caller
    then loads in float and quantizes after)."""
    from lmforge.models.base import PreTrainedModel
    from lmforge.quant.streaming import quantize_while_reading
    from lmforge.sources import resolve

    path = resolve(ref)
    gguf_file, config, model = _skeleton(path, dtype)
    cls = type(model)
    arch = ARCHITECTURES.get(gguf_file.architecture)
    if arch is None or cls.from_hf_layout.__func__ is not PreTrainedModel.from_hf_layout.__func__:
        return None
    keymap = cls.hf_keymap()
    sources = {}  # our tensor name → its GGUF tensor
    for name in gguf_file.tensor_names:
        hf_name = hf_tensor_name(name, arch.tensor_names)
        if hf_name is None:
            return None  # a tensor the plain conversion rejects with its own clear error
        sources[keymap.from_hf(hf_name)] = name

    def read(ours: str) -> torch.Tensor:
        return arch.fix_weight(sources[ours], gguf_file.load_tensor(sources[ours]), config)

    return quantize_while_reading(model, sources, read, method, str(path))
