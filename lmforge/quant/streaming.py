"""Quantize a model while its checkpoint is read, one layer at a time.

Loading a float model and then quantizing it peaks at the whole float model (SmolLM2: ~1.1 GB for
a model that runs in ~100 MB of 4-bit weights). Reading a checkpoint tensor by tensor instead — a
GGUF file, or an HF folder's safetensors, which both give single tensors on demand — each Linear
weight is read in float, quantized and dropped before the next: loading peaks near the memory of the
quantized model plus one float matrix (and the token embedding, which a tied head is quantized from).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmforge.errors import CheckpointError
from lmforge.quant.apply import _return_freed_memory, quantize_model

TRIM_EVERY = 8
"""Layers quantized between two returns of freed memory to the OS while loading (each return costs milliseconds).
SmolLM2 int8, peak RSS and load time: every layer 727 MB, 2.3 s; every 8 layers 679-701 MB, 1.2-1.9 s; every 32
layers 715-763 MB, 1.5 s."""


def quantize_while_reading(model: nn.Module, sources: dict[str, str], read: Callable[[str], torch.Tensor],
                           method: str, path: str) -> nn.Module:
    """Fill `model` (built without touching its weights' memory) from a checkpoint and quantize it with `method`:
    `sources` maps each of the model's tensor names to the checkpoint's, `read(ours)` reads one tensor as float.
    Every weight the model needs (tied copies aside) must be there: a clear CheckpointError otherwise."""
    tied = set(model.tied_weights) if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [name for name, _ in model.named_parameters() if name not in sources and name not in tied]
    if missing:
        raise CheckpointError(f"{path}: no tensor for {', '.join(missing[:5])}; the checkpoint does not hold every "
                              "weight this model needs.")
    linear_weights = {f"{name}.weight" for name, module in model.named_modules() if type(module) is nn.Linear}
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for ours, name in sources.items():
            if ours not in linear_weights:  # norms, the token embedding: read as floats
                if ours not in tensors:
                    raise CheckpointError(f"{path}: tensor {name!r} has no place in {type(model).__name__}; the "
                                          "checkpoint does not match the model built from its config.")
                tensors[ours].copy_(read(ours).view_as(tensors[ours]))
    decoded = []

    def float_weight(layer: str) -> torch.Tensor:
        # the float weights quantized so far are free: every few layers, return them to the OS, or the heap keeps
        # growing (a freed matrix's space is not always reusable once smaller packed tensors sit in it)
        decoded.append(layer)
        if len(decoded) % TRIM_EVERY == 0:
            _return_freed_memory(collect=False)
        return read(f"{layer}.weight")

    quantize_model(model, method, tied_head=True, float_weight=float_weight)
    _return_freed_memory()
    return model.eval()


def quantize_while_loading_hf(folder, method: str, dtype: torch.dtype = torch.float32) -> nn.Module | None:
    """A causal LM from an HF-layout folder (safetensors), its Linear layers quantized with `method` as the tensors
    are read. None where the plain loader must do it (a config with quantized layers or adapters, a model whose
    checkpoint layout needs rewriting, tensors named otherwise): the caller then loads in float and quantizes."""
    from lmforge.checkpoint.hf import hf_tensor_reader
    from lmforge.config import read_config_json
    from lmforge.models.base import PreTrainedModel, skip_weight_init
    from lmforge.peft.adapters import ADAPTERS_KEY
    from lmforge.quant.checkpoint import QUANTIZATION_KEY
    from lmforge.registry import model_class

    config = read_config_json(folder / "config.json")
    if QUANTIZATION_KEY in config or ADAPTERS_KEY in config or "model_type" not in config:
        return None
    cls = model_class(config["model_type"], "causal-lm")
    if cls.from_hf_layout.__func__ is not PreTrainedModel.from_hf_layout.__func__:
        return None
    names, read_tensor = hf_tensor_reader(folder)
    with skip_weight_init():  # memory no one writes is never made resident
        model = cls.from_config(cls.config_class.from_dict(config), dtype)
    keymap = cls.hf_keymap()
    sources = {keymap.from_hf(name): name for name in names}
    if not set(sources) <= {name for name, _ in [*model.named_parameters(), *model.named_buffers()]}:
        return None  # e.g. a backbone's tensors without the causal LM's prefix: the plain loader matches them
    return quantize_while_reading(model, sources, lambda ours: read_tensor(sources[ours]), method, str(folder))
